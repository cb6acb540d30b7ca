"""Which operator replica acts on which learner, and when a replica may start acting. Pure.

Learners are split over ``shards`` by jump consistent hashing (Lamping and Veach, 2014) of their
learnerId, which is immutable (CEL) and written by nobody but the learner's creator, so no one can
move a learner to another shard by editing a label. Growing from n to n+1 shards moves only 1/(n+1)
of the learners. Everything the operator watches lives in a learner's namespace, whose name is a
function of the learnerId (``naming.namespace_name``), so one rule places every object.

Each shard is held by one process at a time through a Lease (``leases``); standbys wait on it. A
Lease records the shard count its holder runs with: a process never starts acting while a live
Lease of a different count exists, so during a change of the shard count the old split runs until
its last holder is gone, and only then the new one starts. Two replicas never act on one learner.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field

from privatefm_operator import naming

KOPF_FINALIZER = f"{naming.GROUP}/operator"  # kopf's, on learners of earlier versions (one per shard: -N)
_KOPF_FINALIZER = re.compile(re.escape(KOPF_FINALIZER) + r"(-\d+)?")
_LEARNER_NAMESPACE = re.compile(r"lrn-(?P<id>.+)-[0-9a-f]{8}")
_ORDINAL = re.compile(r".*-(?P<ordinal>\d+)")


def jump_hash(key: int, buckets: int) -> int:
    """The bucket in [0, buckets) of a 64-bit ``key``; stable, and minimal movement as buckets grow."""
    if buckets < 1:
        raise ValueError("buckets must be at least 1")
    bucket, candidate = -1, 0
    while candidate < buckets:
        bucket = candidate
        key = (key * 2862933555777941757 + 1) % 2**64
        candidate = int((bucket + 1) * ((1 << 31) / ((key >> 33) + 1)))
    return bucket


def shard_of(learner_id: str, shards: int) -> int:
    digest = hashlib.sha256(f"privatefm-shard:{learner_id}".encode()).digest()
    return jump_hash(int.from_bytes(digest[:8], "big"), shards)


def learner_id_of_namespace(namespace: str) -> str | None:
    """The learnerId whose namespace this is, or None for any other namespace. A namespace named
    like ours but not ours (the uid part does not match the id) is no learner's."""
    found = _LEARNER_NAMESPACE.fullmatch(namespace)
    if found is None:
        return None
    learner_id = found["id"]
    return learner_id if naming.namespace_name(learner_id, naming.ns_uid(learner_id)) == namespace else None


def ordinal(hostname: str) -> int | None:
    """A StatefulSet pod's ordinal, from its name (``privatefm-operator-3`` → 3)."""
    found = _ORDINAL.fullmatch(hostname)
    return int(found["ordinal"]) if found else None


@dataclass(frozen=True)
class Shard:
    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} is not in [0, {self.count})")

    @classmethod
    def of_replica(cls, replica: int, count: int) -> Shard:
        """Replica k of a StatefulSet of count * (1 + standbys) pods serves shard k mod count."""
        return cls(replica % count, count)

    def owns_learner(self, learner_id: str) -> bool:
        return self.count == 1 or shard_of(learner_id, self.count) == self.index

    def owns_namespace(self, namespace: str) -> bool:
        """Objects outside every learner namespace (which the operator only ever reports on) go
        to shard 0."""
        learner_id = learner_id_of_namespace(namespace)
        return self.index == 0 if learner_id is None else self.owns_learner(learner_id)

    @property
    def lease(self) -> str:
        return f"privatefm-operator-shard-{self.index}"


def without_kopf_finalizers(finalizers: list[str]) -> list[str]:
    """``finalizers`` without those kopf wrote when it handled LearnerNamespaces (earlier versions,
    one per shard). Only the learner's owner calls this, and only while it holds its shard's Lease,
    so no process that could still need one runs."""
    return [f for f in finalizers if not _KOPF_FINALIZER.fullmatch(f)]


@dataclass(frozen=True)
class LeaseRecord:
    """What a Lease says, as read: who holds it, with which shard count, at which resourceVersion."""
    name: str
    holder: str
    shards: int | None
    resource_version: str
    duration: float
    transitions: int = 0


@dataclass
class LeaseObserver:
    """Tells live Leases from dead ones by this process's own clock, never by the renewTime a
    holder wrote (clocks differ between nodes): a held Lease is live until its record has not
    changed for its whole duration, as this process watched it."""
    _seen: dict[str, tuple[str, float]] = field(default_factory=dict)  # name -> (resourceVersion, since)

    def observe(self, record: LeaseRecord, now: float) -> None:
        seen = self._seen.get(record.name)
        if seen is None or seen[0] != record.resource_version:
            self._seen[record.name] = (record.resource_version, now)

    def live(self, record: LeaseRecord, now: float) -> bool:
        if not record.holder:
            return False  # released
        since = self._seen.get(record.name, (record.resource_version, now))[1]
        return now - since < record.duration

    def may_take(self, record: LeaseRecord | None, identity: str, now: float) -> bool:
        return record is None or record.holder == identity or not self.live(record, now)

    def other_counts(self, records: list[LeaseRecord], shards: int, now: float) -> list[LeaseRecord]:
        """Live Leases held with a shard count other than ``shards``: while any exists, wait."""
        return [r for r in records if r.shards != shards and self.live(r, now)]
