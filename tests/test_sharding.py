"""Which replica acts on which learner (``privatefm_operator.sharding``): pure, no server."""

from __future__ import annotations

from collections import Counter

import pytest
from privatefm_operator import naming
from privatefm_operator.settings import Settings
from privatefm_operator.sharding import (
    KOPF_FINALIZER,
    LeaseObserver,
    LeaseRecord,
    Shard,
    jump_hash,
    learner_id_of_namespace,
    shard_of,
    without_kopf_finalizers,
)

IDS = [f"learner-{n}" for n in range(10_000)]


def test_jump_hash_is_stable_in_range_and_moves_only_to_the_new_bucket() -> None:
    keys = [(k * 0x9E3779B97F4A7C15) % 2**64 for k in range(5_000)]
    for buckets in range(1, 12):
        before = [jump_hash(k, buckets) for k in keys]
        assert all(0 <= b < buckets for b in before)
        assert before == [jump_hash(k, buckets) for k in keys]
        after = [jump_hash(k, buckets + 1) for k in keys]
        # Growing by one bucket moves a key only into the new bucket, never between old ones.
        assert all(a in (b, buckets) for a, b in zip(after, before, strict=True))
    with pytest.raises(ValueError):
        jump_hash(1, 0)


def test_learners_spread_evenly_and_growing_moves_few() -> None:
    for shards in (2, 3, 5, 8):
        counts = Counter(shard_of(i, shards) for i in IDS)
        assert set(counts) == set(range(shards))
        assert max(counts.values()) / min(counts.values()) < 1.15, counts
    moved = sum(shard_of(i, 4) != shard_of(i, 5) for i in IDS)
    assert 0.15 < moved / len(IDS) < 0.25  # about 1/5; a modulo would move about 4/5


def test_every_object_has_exactly_one_owner() -> None:
    for shards in (1, 2, 3):
        replicas = [Shard(i, shards) for i in range(shards)]
        for learner_id in IDS[:500]:
            namespace = naming.namespace_name(learner_id, naming.ns_uid(learner_id))
            assert sum(s.owns_learner(learner_id) for s in replicas) == 1
            # The namespace (and everything in it) belongs to its learner's shard.
            assert [s.owns_namespace(namespace) for s in replicas] == [s.owns_learner(learner_id) for s in replicas]
        # Any other namespace goes to shard 0 alone.
        assert [s.owns_namespace("kube-system") for s in replicas] == [i == 0 for i in range(shards)]


def test_a_namespace_names_its_learner_only_when_its_uid_matches() -> None:
    for learner_id in ("a", "bo", "with-dashes-1", "x" * 40):
        namespace = naming.namespace_name(learner_id, naming.ns_uid(learner_id))
        assert learner_id_of_namespace(namespace) == learner_id
    # Named like a learner's, but the uid part is not that learner's: no learner's.
    assert learner_id_of_namespace("lrn-bo-00000000") is None
    assert learner_id_of_namespace("default") is None


def test_shard_of_a_replica_and_its_lease() -> None:
    assert [Shard.of_replica(k, 3).index for k in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert Shard(2, 3).lease == "privatefm-operator-shard-2"
    with pytest.raises(ValueError):
        Shard(3, 3)


def test_the_owner_drops_the_finalizers_kopf_wrote_in_earlier_versions_and_only_those() -> None:
    others = [naming.GUARDIAN_FINALIZER, "example.com/keep", f"{KOPF_FINALIZER}-x", f"{KOPF_FINALIZER}x"]
    finalizers = [KOPF_FINALIZER, f"{KOPF_FINALIZER}-0", *others[:2], f"{KOPF_FINALIZER}-12", *others[2:]]
    assert without_kopf_finalizers(finalizers) == others
    assert without_kopf_finalizers([]) == []


def record(holder: str = "a", rv: str = "1", shards: int | None = 2, name: str = "shard-0") -> LeaseRecord:
    return LeaseRecord(name=name, holder=holder, shards=shards, resource_version=rv, duration=15)


def test_a_lease_is_live_until_unchanged_for_its_duration_by_the_observers_clock() -> None:
    observer = LeaseObserver()
    observer.observe(record(rv="1"), now=100)
    assert observer.live(record(rv="1"), now=114)
    assert not observer.may_take(record(rv="1"), "b", now=114)
    assert not observer.live(record(rv="1"), now=115)  # not renewed for 15 s, as this process saw it
    assert observer.may_take(record(rv="1"), "b", now=115)
    observer.observe(record(rv="2"), now=120)  # renewed: live again, whatever its renewTime says
    assert observer.live(record(rv="2"), now=134)
    assert not observer.live(record(holder="", rv="3"), now=121)  # released: free at once
    assert observer.may_take(None, "b", now=0)
    assert observer.may_take(record(rv="2"), "a", now=121)  # its own


def test_a_process_waits_while_a_live_lease_runs_another_shard_count() -> None:
    observer = LeaseObserver()
    old, new = record(name="shard-1", shards=2), record(name="shard-0", shards=3, holder="b")
    for r in (old, new):
        observer.observe(r, now=0)
    assert observer.other_counts([old, new], shards=3, now=10) == [old]
    assert observer.other_counts([old, new], shards=2, now=10) == [new]
    assert observer.other_counts([old, new], shards=3, now=15) == []  # the old holder is gone


def test_settings_place_the_process_and_refuse_shards_without_leases() -> None:
    assert Settings(shards=3, lease_namespace="ops").shard("privatefm-operator-4") == Shard(1, 3)
    assert Settings(shards=3, shard_index=2, lease_namespace="ops").shard("laptop") == Shard(2, 3)
    assert Settings().shard("laptop") == Shard(0, 1)
    with pytest.raises(ValueError, match="lease_namespace"):
        Settings(shards=2)
    with pytest.raises(ValueError, match="retry < renew deadline < duration"):
        Settings(lease_duration_seconds=5, lease_renew_deadline_seconds=10)
    with pytest.raises(ValueError, match="no StatefulSet ordinal"):
        Settings(shards=2, lease_namespace="ops").shard("laptop")
