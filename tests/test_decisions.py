"""Pure logic, table-tested with no server: decisions, conditions and builders."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from privatefm_merge.adapter_log import AdapterMode
from privatefm_merge.contract import AdapterRef, MergeJob, MergeResult
from privatefm_operator import builders, conditions, decisions, naming
from privatefm_operator.api import (
    VERSION_ASSIGNMENTS_KEPT,
    Checkpoint,
    IntegrityStatus,
    LearnerNamespaceSpec,
    LearnerNamespaceStatus,
    LearnerPhase,
    MergePhase,
    MergeTrigger,
    RecoveryStatus,
)
from privatefm_operator.reconcilers.base import merge_patch
from privatefm_operator.settings import Settings


@pytest.mark.parametrize(("last", "current", "expected"), [
    (None, None, 1), (0, None, 1), (3, None, 4), (3, 5, 6), (7, 5, 8),
])
def test_next_version_is_monotonic(last: int | None, current: int | None, expected: int) -> None:
    assert decisions.next_version(last, current) == expected


@pytest.mark.parametrize(("latest", "base", "lag"), [(None, 1, None), (4, None, None), (4, 1, 3), (5, 1, 4),
                                                      (1, 3, 0)])
def test_version_lag(latest: int | None, base: int | None, lag: int | None) -> None:
    assert decisions.version_lag(latest, base) == lag


@pytest.mark.parametrize(("requested", "current", "pinned", "latest", "expected"), [
    (2, 1, 3, 4, 2), (None, 1, 3, 4, 1), (None, None, 3, 4, 3), (None, None, None, 4, 4),
    (None, None, None, None, None),
])
def test_base_version_for_run(requested: int | None, current: int | None, pinned: int | None,
                              latest: int | None, expected: int | None) -> None:
    assert decisions.base_version_for_run(requested, current, pinned, latest) == expected


@pytest.mark.parametrize(("current", "candidate", "advance"), [(None, 1, True), (1, 2, True), (3, 2, False),
                                                                (2, 2, False)])
def test_checkpoint_never_moves_back(current: int | None, candidate: int, advance: bool) -> None:
    assert decisions.should_advance(current, candidate) is advance


OK = MergeResult(status="Succeeded", version=1, manifest_sha256="a" * 64).to_json()
BAD = MergeResult(status="Failed", reason="ShapeMismatch", message="q_proj: 64x4 vs 48x4").to_json()


def cond(type_: str, reason: str = "") -> dict[str, Any]:
    return {"type": type_, "status": "True", "reason": reason}


@pytest.mark.parametrize(("status", "message", "phase", "reason"), [
    ({}, None, MergePhase.PENDING, "Pending"),
    ({"active": 1}, None, MergePhase.PENDING, "Pending"),  # active counts pending pods: the pods decide
    ({"conditions": [cond("Complete")]}, OK, MergePhase.SUCCEEDED, "Merged"),
    ({"conditions": [cond("SuccessCriteriaMet"), cond("Complete")]}, OK, MergePhase.SUCCEEDED, "Merged"),
    ({"conditions": [cond("Complete")]}, None, MergePhase.FAILED, "ResultMissing"),
    ({"conditions": [cond("Complete")]}, "not json", MergePhase.FAILED, "ResultMissing"),
    ({"conditions": [cond("Complete")]}, BAD, MergePhase.FAILED, "ResultMissing"),
    ({"conditions": [cond("Failed", "BackoffLimitExceeded")]}, BAD, MergePhase.FAILED, "ShapeMismatch"),
    ({"conditions": [cond("Failed", "DeadlineExceeded")]}, None, MergePhase.FAILED, "DeadlineExceeded"),
    ({"conditions": [cond("FailureTarget", "BackoffLimitExceeded")]}, None, MergePhase.FAILED,
     "BackoffLimitExceeded"),
])
def test_job_outcome(status: dict[str, Any], message: str | None, phase: MergePhase, reason: str) -> None:
    outcome = decisions.job_outcome(status, message)
    assert (outcome.phase, outcome.reason) == (phase, reason)
    assert decisions.job_finished(status) is (phase in (MergePhase.SUCCEEDED, MergePhase.FAILED))


T0 = datetime(2026, 1, 1, tzinfo=UTC)
UNSCHEDULABLE = ("0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are available: "
                 "1 No preemption victims found for incoming pod.")


def pod(name: str = "m-abc", phase: str = "Pending", created: str = "2026-01-01T00:00:00Z",
        conditions: list[dict[str, Any]] | None = None, waiting: dict[str, Any] | None = None,
        deleted: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "creationTimestamp": created}
    if deleted:
        meta["deletionTimestamp"] = created
    status: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
    if waiting is not None:
        status["containerStatuses"] = [{"name": "merge", "state": {"waiting": waiting}}]
    return {"metadata": meta, "spec": {"nodeName": "gpu-1"} if phase == "Running" else {}, "status": status}


def unschedulable(at: str = "2026-01-01T00:00:05Z") -> list[dict[str, Any]]:
    return [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": UNSCHEDULABLE,
             "lastTransitionTime": at}]


JOB = {"metadata": {"name": "m", "creationTimestamp": "2026-01-01T00:00:00Z"},
       "status": {"active": 1, "startTime": "2026-01-01T00:00:00Z"}}


@pytest.mark.parametrize(("pods", "after", "phase", "reason", "stalled", "says"), [
    ([pod(phase="Running")], 10, MergePhase.RUNNING, "Running", False, "running on gpu-1"),
    ([pod(phase="Running")], 99999, MergePhase.RUNNING, "Running", False, ""),  # running: no timeout
    ([pod(conditions=unschedulable())], 60, MergePhase.PENDING, "Unschedulable", False, "Insufficient nvidia.com/gpu"),
    ([pod(conditions=unschedulable())], 604, MergePhase.PENDING, "Unschedulable", False, ""),  # since it was found so
    ([pod(conditions=unschedulable())], 605, MergePhase.PENDING, "Unschedulable", True, "for more than 0:10:00"),
    ([pod(waiting={"reason": "ImagePullBackOff", "message": "pull access denied"})], 5, MergePhase.PENDING,
     "ImagePullBackOff", False, "pull access denied"),
    ([pod(waiting={"reason": "ImagePullBackOff"})], 600, MergePhase.PENDING, "ImagePullBackOff", True, ""),
    ([pod()], 5, MergePhase.PENDING, "PodPending", False, "m-abc is pending"),
    ([], 5, MergePhase.PENDING, "PodNotCreated", False, "has not created a pod"),
    ([], 600, MergePhase.PENDING, "PodNotCreated", True, ""),
    ([pod("old", phase="Running", deleted=True), pod("new", created="2026-01-01T00:00:01Z",
                                                     conditions=unschedulable())], 5,
     MergePhase.PENDING, "Unschedulable", False, "pod new cannot be scheduled"),  # a deleted pod counts for nothing
])
def test_pod_progress(pods: list[dict[str, Any]], after: int, phase: MergePhase, reason: str, stalled: bool,
                      says: str) -> None:
    outcome = decisions.pod_progress(JOB, pods, T0 + timedelta(seconds=after), timedelta(minutes=10))
    assert (outcome.phase, outcome.reason, outcome.stalled) == (phase, reason, stalled)
    assert says in outcome.message


def kstatus_of(conds: list[Any]) -> tuple[str, str, str]:
    by = {c.type: c.status.value for c in conds}
    return by["Ready"], by["Reconciling"], by["Stalled"]


@pytest.mark.parametrize(("phase", "stalled", "expected"), [
    (MergePhase.PENDING, False, ("False", "True", "False")),
    (MergePhase.RUNNING, False, ("False", "True", "False")),
    (MergePhase.PENDING, True, ("False", "False", "True")),
    (MergePhase.SUCCEEDED, False, ("True", "False", "False")),
    (MergePhase.FAILED, False, ("False", "False", "True")),
])
def test_every_merge_phase_carries_the_kstatus_conditions(phase: MergePhase, stalled: bool,
                                                          expected: tuple[str, str, str]) -> None:
    conds = decisions.merge_conditions(phase, "Why", "what", 1, T0, stalled=stalled)
    assert kstatus_of(conds) == expected
    assert all(c.observed_generation == 1 for c in conds)


def test_a_first_status_is_reconciling_at_once_and_only_once_per_generation() -> None:
    first = decisions.first_status(LearnerNamespaceStatus(), 1, T0)
    assert first is not None and first.observed_generation == 1 and first.phase == LearnerPhase.PROVISIONING
    assert kstatus_of(first.conditions) == ("False", "True", "False")
    assert decisions.first_status(first, 1, T0) is None  # this generation has been seen
    ready = first.model_copy(update={"phase": LearnerPhase.READY, "conditions": conditions.kstatus(
        1, T0, ready=True, reconciling=False, stalled=False, reason="CheckpointVerified", message="")})
    changed = decisions.first_status(ready, 2, T0 + timedelta(seconds=1))
    assert changed is not None and changed.observed_generation == 2
    assert changed.phase == LearnerPhase.READY  # a spec change keeps Ready; only Reconciling turns on
    assert kstatus_of(changed.conditions) == ("True", "True", "False")
    # the API server's default for a status nobody wrote yet (the CRD's status default)
    assert decisions.first_status(LearnerNamespaceStatus(observed_generation=0), 1, T0) is not None


@pytest.mark.parametrize(("claimed", "actual", "version", "bad", "accepted", "needle"), [
    ("a" * 64, "a" * 64, 1, [], True, "verified"),
    ("a" * 64, "a" * 64, 1, ["model-00001-of-00002.safetensors"], False, "model-00001"),
    ("a" * 64, "b" * 64, 1, [], False, "differs"),
    ("a" * 64, "a" * 64, 2, [], False, "version 2"),
])
def test_accept_checkpoint(claimed: str, actual: str, version: int, bad: list[str], accepted: bool,
                           needle: str) -> None:
    result = MergeResult(status="Succeeded", version=1, manifest_sha256=claimed)
    verdict = decisions.accept_checkpoint(result, 1, actual, version, bad)
    assert verdict.accepted is accepted and needle in verdict.message


T0, T1, T2, T3, T4 = (datetime(2026, 1, 1, 0, 0, n, tzinfo=UTC) for n in range(5))


def test_condition_transition_time_changes_only_with_status() -> None:
    first = conditions.merge([], [conditions.condition("Ready", False, "Provisioning", "", 1, T1)])
    same = conditions.merge(first, [conditions.condition("Ready", False, "StillProvisioning", "x", 2, T2)])
    assert same[0].last_transition_time == T1 and same[0].reason == "StillProvisioning"
    flipped = conditions.merge(same, [conditions.condition("Ready", True, "Provisioned", "", 2, T3)])
    assert flipped[0].last_transition_time == T3
    degraded = conditions.condition("Degraded", False, "WithinLag", "", 2, T0)
    kept = conditions.merge([*flipped, degraded], [conditions.condition("Ready", True, "Provisioned", "", 3, T4)])
    assert [c.type for c in kept] == ["Ready", "Degraded"] and kept[1].last_transition_time == T0


# ---- the learner's status from observed facts ------------------------------------------------
def checkpoint(version: int, base: int) -> Checkpoint:
    return Checkpoint(version=version, uri=f"s3://b/learners/u/checkpoints/v{version}", manifest_sha256="a" * 64,
                      base_version=base)


def facts(**changes: Any) -> decisions.LearnerFacts:
    base = {"generation": 2, "now": T1, "ns_uid": "abc", "namespace": "lrn-x-abc", "latest_base": 1}
    return decisions.LearnerFacts(**(base | changes))


def by_type(status: LearnerNamespaceStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status.value, c.reason) for c in status.conditions}


@pytest.mark.parametrize(("observed", "current", "phase", "ready", "stalled", "reason", "degraded", "lag"), [
    (facts(), None, LearnerPhase.READY, "True", "False", "Provisioned", "False", None),
    (facts(latest_base=2), checkpoint(1, 2), LearnerPhase.READY, "True", "False", "CheckpointVerified", "False", 0),
    (facts(latest_base=4), checkpoint(3, 1), LearnerPhase.READY, "True", "False", "CheckpointVerified", "False", 3),
    (facts(latest_base=5), checkpoint(3, 1), LearnerPhase.DEGRADED, "True", "False", "CheckpointVerified", "True", 4),
    (facts(latest_base=5, max_lag=5), checkpoint(3, 1), LearnerPhase.READY, "True", "False", "CheckpointVerified",
     "False", 4),
    (facts(base_problem="base model m v9 is not in the store"), None, LearnerPhase.FAILED, "False", "True",
     "BaseModelNotFound", "False", None),
    (facts(base_problem="gone", latest_base=9), checkpoint(1, 1), LearnerPhase.FAILED, "False", "True",
     "BaseModelNotFound", "True", 8),
])
def test_learner_status(observed: decisions.LearnerFacts, current: Checkpoint | None, phase: LearnerPhase,
                        ready: str, stalled: str, reason: str, degraded: str, lag: int | None) -> None:
    old = LearnerNamespaceStatus(current_checkpoint=current, last_assigned_version=7)
    new = decisions.learner_status(observed, old)
    conds = by_type(new)
    assert new.phase == phase and new.version_lag == lag
    assert conds["Ready"] == (ready, reason) and conds["Stalled"][0] == stalled
    assert conds["Reconciling"] == ("False", "Idle") and conds["Degraded"][0] == degraded
    assert all(c.observed_generation == 2 for c in new.conditions)
    assert (new.ns_uid, new.namespace, new.base_model_latest_version) == ("abc", "lrn-x-abc", observed.latest_base)
    kept = decisions.learner_status(observed, old.model_copy(update={"ns_uid": "recorded"}))
    assert kept.ns_uid == "recorded"  # immutable once set: never rewritten
    # What other writers own is carried over untouched.
    assert new.current_checkpoint == current and new.last_assigned_version == 7


def test_invalid_spec_is_stalled_and_touches_nothing_else() -> None:
    old = LearnerNamespaceStatus(ns_uid="keep", current_checkpoint=checkpoint(2, 1), version_lag=0)
    new = decisions.learner_status(decisions.LearnerFacts(generation=3, now=T1, spec_problem="bad"), old)
    assert new.phase == LearnerPhase.FAILED and by_type(new)["Stalled"] == ("True", "InvalidSpec")
    assert (new.ns_uid, new.current_checkpoint, new.version_lag) == ("keep", old.current_checkpoint, 0)


def test_learner_status_is_stable_when_nothing_changed() -> None:
    once = decisions.learner_status(facts(), LearnerNamespaceStatus())
    again = decisions.learner_status(facts(now=T4), once)
    assert again == once  # no status write is needed on an idle resync


def test_insecure_store_mode_is_loud_on_every_learner() -> None:
    conds = by_type(decisions.learner_status(facts(scoped_store=False), LearnerNamespaceStatus()))
    assert conds["ScopedStoreCredentials"] == ("False", "SharedCredentials")
    assert by_type(decisions.learner_status(facts(), LearnerNamespaceStatus()))["ScopedStoreCredentials"] == (
        "True", "SessionPolicy")


GRACE = timedelta(seconds=60)


@pytest.mark.parametrize(("down_for", "ready", "phase", "reason"), [
    (None, "True", LearnerPhase.READY, "CheckpointVerified"),              # reachable
    (timedelta(0), "True", LearnerPhase.READY, "CheckpointVerified"),      # just went away: within the grace
    (timedelta(seconds=59), "True", LearnerPhase.READY, "CheckpointVerified"),
    (timedelta(seconds=60), "False", LearnerPhase.DEGRADED, "StoreUnreachable"),
    (timedelta(hours=3), "False", LearnerPhase.DEGRADED, "StoreUnreachable"),
])
def test_store_outage_flips_ready_after_the_grace(down_for: timedelta | None, ready: str, phase: LearnerPhase,
                                                  reason: str) -> None:
    seen = decisions.learner_status(facts(latest_base=2), LearnerNamespaceStatus(current_checkpoint=checkpoint(1, 2)))
    if down_for is None:
        new = decisions.learner_status(facts(latest_base=2, now=T2), seen)
    else:
        went = decisions.learner_status(facts(now=T2, store_problem="connect timeout", store_grace=GRACE), seen)
        new = decisions.learner_status(facts(now=T2 + down_for, store_problem="connect timeout", store_grace=GRACE),
                                       went)
    conds = by_type(new)
    assert conds["Ready"] == (ready, reason) and new.phase == phase
    assert conds["StoreAvailable"][0] == ("True" if down_for is None else "False")
    assert conds["Stalled"][0] == "False"  # it recovers by itself: never Stalled
    assert new.base_model_latest_version == 2 and new.version_lag == 0  # what was last seen is kept


def test_store_recovery_clears_the_outage() -> None:
    down = decisions.learner_status(facts(now=T1, store_problem="x", store_grace=timedelta(0)),
                                    LearnerNamespaceStatus())
    assert by_type(down)["Ready"] == ("False", "StoreUnreachable")
    back = decisions.learner_status(facts(now=T3), down)
    assert by_type(back)["Ready"] == ("True", "Provisioned") and by_type(back)["StoreAvailable"][0] == "True"
    assert next(c for c in back.conditions if c.type == "StoreAvailable").last_transition_time == T3


@pytest.mark.parametrize(("reason", "observed", "generation", "skip"), [
    ("InvalidSpec", 3, 3, True),        # refused, and the spec has not changed since
    ("InvalidSpec", 3, 4, False),       # the spec changed: try again
    ("BaseModelNotFound", 3, 3, False),  # other stalls are looked at every resync
])
def test_a_refused_spec_is_not_retried_until_it_changes(reason: str, observed: int, generation: int,
                                                        skip: bool) -> None:
    status = LearnerNamespaceStatus(conditions=conditions.kstatus(observed, T1, ready=False, reconciling=False,
                                                                  stalled=True, reason=reason, message="m"))
    assert decisions.skip_invalid_spec(status, generation) is skip


# ---- identity ---------------------------------------------------------------------------------
OURS = {"app.kubernetes.io/managed-by": "privatefm-operator", "privatefm.io/learner": "ada",
        "privatefm.io/ns-uid": "abc"}


@pytest.mark.parametrize(("labels", "alive", "claim", "reason"), [
    (None, False, decisions.Claim.CREATE, None),
    (OURS, False, decisions.Claim.OWN, None),
    (OURS | {"privatefm.io/learner": "ada-old"}, False, decisions.Claim.ADOPT, None),       # its CR is gone
    (OURS | {"privatefm.io/learner": "ada-twin"}, True, decisions.Claim.IN_USE, "LearnerIdInUse"),
    ({"privatefm.io/learner": "ada"}, False, decisions.Claim.FOREIGN, "NamespaceConflict"),  # not made by us
    ({}, False, decisions.Claim.FOREIGN, "NamespaceConflict"),
])
def test_namespace_claim(labels: dict[str, str] | None, alive: bool, claim: decisions.Claim,
                         reason: str | None) -> None:
    assert decisions.namespace_claim(labels, "ada", alive) == claim
    failure = decisions.claim_failure(claim, "lrn-ada-abc", "ada-twin")
    assert (failure.reason if failure else None) == reason


def test_a_claim_problem_stalls_the_learner() -> None:
    new = decisions.learner_status(facts(claim_problem=decisions.Failure("LearnerIdInUse", "taken")),
                                   LearnerNamespaceStatus())
    assert new.phase == LearnerPhase.FAILED and by_type(new)["Stalled"] == ("True", "LearnerIdInUse")


def test_ns_uid_is_a_function_of_the_learner_id_alone() -> None:
    assert naming.ns_uid("ada") == naming.ns_uid("ada") != naming.ns_uid("bo")
    assert re.fullmatch(r"[0-9a-f]{12}", naming.ns_uid("ada"))


@pytest.mark.parametrize(("namespace", "labels", "ok"), [
    ("lrn-ada-abc", OURS, True),
    ("lrn-mallory-123", OURS, False),                                       # labelled for ada, but not ada's
    ("lrn-ada-abc", OURS | {"privatefm.io/ns-uid": "zzz"}, False),
    ("lrn-ada-abc", {k: v for k, v in OURS.items() if k != "app.kubernetes.io/managed-by"}, False),
])
def test_is_learner_namespace(namespace: str, labels: dict[str, str], ok: bool) -> None:
    assert decisions.is_learner_namespace(namespace, labels, "lrn-ada-abc", "abc") is ok


@pytest.mark.parametrize(("refs", "ok"), [
    ([{"kind": "CronJob", "uid": "u1"}], True),
    ([{"kind": "CronJob", "uid": "u2"}], False),
    ([{"kind": "AdapterMerge", "uid": "u1"}], False),
    ([], False),
])
def test_owned_by(refs: list[dict[str, str]], ok: bool) -> None:
    assert decisions.owned_by({"ownerReferences": refs}, "CronJob", "u1") is ok


ROOT = "s3://b/learners/abc/checkpoints"


@pytest.mark.parametrize(("uri", "trusted"), [
    (f"{ROOT}/v3", True), ("s3://evil/x", False), (f"{ROOT}/v4", False), ("s3://b/learners/zzz/checkpoints/v3", False),
])
def test_only_a_checkpoint_in_the_learners_own_place_is_trusted(uri: str, trusted: bool) -> None:
    cp = checkpoint(3, 1).model_copy(update={"uri": uri})
    status = LearnerNamespaceStatus(current_checkpoint=cp)
    assert (decisions.trusted_checkpoint(status, ROOT) is not None) is trusted
    new = decisions.learner_status(facts(checkpoints_uri=ROOT), status)
    assert by_type(new)["CheckpointTrusted"][0] == ("True" if trusted else "False")
    assert new.current_checkpoint == cp  # reported, never silently rewritten
    real = checkpoint(2, 1).model_copy(update={"uri": f"{ROOT}/v2"})
    advanced = decisions.advance_checkpoint(status, real, ROOT).current_checkpoint
    assert advanced == (cp if trusted else real)  # a forged pointer never blocks a real checkpoint


def test_a_recreated_learner_takes_up_its_history() -> None:
    merges = ({"version": 2, "baseVersion": 1, "adapterSeq": 1, "manifestSha256": "b" * 64,
               "at": "2026-01-01T00:00:00Z"},
              {"version": 4, "baseVersion": 2, "adapterSeq": 3, "manifestSha256": "c" * 64},
              {"version": "garbage"})
    new = decisions.learner_status(facts(checkpoints_uri=ROOT, history=decisions.History(5, merges)),
                                   LearnerNamespaceStatus())
    assert new.last_assigned_version == 5  # v5 was written to (a failed run): it is never handed out again
    assert new.current_checkpoint is not None and new.current_checkpoint.version == 4
    assert new.current_checkpoint.uri == f"{ROOT}/v4" and new.current_checkpoint.base_version == 2
    fresh = decisions.learner_status(facts(checkpoints_uri=ROOT, history=decisions.History(None)),
                                     LearnerNamespaceStatus())
    assert (fresh.last_assigned_version, fresh.current_checkpoint) == (0, None)
    seen = LearnerNamespaceStatus(last_assigned_version=1)
    assert decisions.learner_status(facts(checkpoints_uri=ROOT, history=decisions.History(9, merges)),
                                    seen).last_assigned_version == 1  # a status that has a counter keeps it


@pytest.mark.parametrize(("pinned", "found", "latest", "problem"), [
    (None, False, 3, ""), (2, True, 3, ""), (2, False, 3, "m v2 is not in the store"),
    (None, False, None, "no published version"), (1, True, None, ""),
])
def test_base_problem(pinned: int | None, found: bool, latest: int | None, problem: str) -> None:
    got = decisions.base_problem("m", pinned, found, latest)
    assert (problem in got and bool(got)) if problem else got == ""


@pytest.mark.parametrize(("base", "found", "adapter", "reason", "needle"), [
    (1, True, 3, None, ""),
    (1, True, 0, None, ""),
    (None, False, 3, "BaseModelNotFound", "no published version"),
    (2, False, 3, "BaseModelNotFound", "m v2 is not in the store"),
    (1, True, None, "NoAdapter", "learners/u/adapters/"),
    (None, False, None, "BaseModelNotFound", "m"),  # the base is checked first
])
def test_plan_failure(base: int | None, found: bool, adapter: int | None, reason: str | None, needle: str) -> None:
    failure = decisions.plan_failure("m", base, found, adapter, "learners/u/adapters")
    assert (failure.reason if failure else None) == reason
    assert failure is None or needle in failure.message


@pytest.mark.parametrize(("last", "current", "expected"), [(None, None, 1), (4, 2, 5), (1, 3, 4)])
def test_allocate_version(last: int | None, current: int | None, expected: int) -> None:
    status = LearnerNamespaceStatus(last_assigned_version=last,
                                    current_checkpoint=checkpoint(current, 1) if current else None)
    allocated = decisions.allocate_version(status, "run-a")
    assert allocated.last_assigned_version == expected
    assert decisions.assigned_version(allocated, "run-a") == expected


def test_a_run_that_lost_its_version_gets_the_same_one_again_and_no_gap_opens() -> None:
    """The operator stopped after handing run b its version but before b recorded it: b's next
    plan takes the same version, even after run c took the next one."""
    status = LearnerNamespaceStatus(last_assigned_version=2)
    status = decisions.allocate_version(status, "b")
    status = decisions.allocate_version(status, "c")
    again = decisions.allocate_version(status, "b")
    assert again == status, "no write: b already has a version"
    assert decisions.assigned_version(again, "b") == 3 and decisions.assigned_version(again, "c") == 4
    for i in range(40):  # only the newest are kept, so the status stays small
        status = decisions.allocate_version(status, f"r{i}")
    assert len(status.version_assignments) == VERSION_ASSIGNMENTS_KEPT
    assert status.last_assigned_version == 44 and decisions.assigned_version(status, "r39") == 44
    assert decisions.assigned_version(status, "b") is None


@pytest.mark.parametrize(("current", "candidate", "after"), [(None, 1, 1), (1, 2, 2), (3, 2, 3), (2, 2, 2)])
def test_advance_checkpoint(current: int | None, candidate: int, after: int) -> None:
    status = LearnerNamespaceStatus(current_checkpoint=checkpoint(current, 1) if current else None, version_lag=0)
    advanced = decisions.advance_checkpoint(status, checkpoint(candidate, 2))
    assert advanced.current_checkpoint is not None and advanced.current_checkpoint.version == after
    assert advanced.version_lag == 0  # the lag is the learner reconcile's to derive


# ---- builders --------------------------------------------------------------------------------
SPEC = LearnerNamespaceSpec.model_validate({
    "learnerId": "ada", "baseModel": {"name": "tiny-llama"}, "guardians": [{"kind": "User", "name": "p"}],
    "merge": {"gpus": 2, "nodeSelector": {"gpu": "a100"}, "tolerations": [{"key": "gpu", "operator": "Exists"}],
              "timeZone": "Europe/Berlin"}})
LEARNER = builders.Learner(name="learner-ada", ns_uid="abcdef123456", namespace="lrn-ada-abcdef12",
                           spec=SPEC)
SETTINGS = Settings(s3_endpoint="http://10.1.2.3:9000", merge_image="example/merge:1")


def test_namespace_is_restricted_and_not_owned() -> None:
    ns = builders.namespace(LEARNER)
    assert "ownerReferences" not in ns["metadata"]
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    # Nothing inside is owned by the CR either: deleting it (or its CRD) must not cascade.
    assert all("ownerReferences" not in c["metadata"] for c in builders.children(LEARNER, SETTINGS))


@pytest.mark.parametrize(("endpoint", "override", "to", "port"), [
    ("http://10.1.2.3:9000", "", [{"ipBlock": {"cidr": "10.1.2.3/32"}}], 9000),
    ("https://s3.example.internal", "", None, 443),
    ("https://s3.example.internal", "10.0.0.0/8", [{"ipBlock": {"cidr": "10.0.0.0/8"}}], 443),
    ("http://[fd00::5]:80", "", [{"ipBlock": {"cidr": "fd00::5/128"}}], 80),
])
def test_s3_egress(endpoint: str, override: str, to: list[dict[str, Any]] | None, port: int) -> None:
    rule = builders.s3_egress(endpoint, override)
    assert rule.get("to") == to and rule["ports"] == [{"protocol": "TCP", "port": port}]


def test_cronjob_follows_the_spec() -> None:
    cron = builders.cronjob(LEARNER, SETTINGS)["spec"]
    assert cron["timeZone"] == "Europe/Berlin" and cron["concurrencyPolicy"] == "Forbid"
    pod = cron["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu": "a100"} and pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["image"] == "example/merge:1"
    assert {"name": "PRIVATEFM_DEVICE", "value": "cuda"} in container["env"]
    assert builders.resource_quota(LEARNER, SETTINGS)["spec"]["hard"]["requests.nvidia.com/gpu"] == "2"


def test_job_parameters_reach_the_merge_contract_through_the_downward_api() -> None:
    """Builder annotations + fieldRef env, resolved as the kubelet would, give back the same MergeJob."""
    job = MergeJob(base_uri="s3://b/base/tiny-llama/v1",
                   adapters=(AdapterRef(2, "s3://b/learners/x/adapters/2"), AdapterRef(3, "s3://b/learners/x/adapters/3")),
                   output_uri="s3://b/learners/x/checkpoints/v7", base_model="tiny-llama", base_version=1,
                   parent_version=6, target_version=7, device="cpu")
    annotations = builders.job_params(job)
    spec = builders.merge_job(LEARNER, SETTINGS, "run", MergeTrigger.MANUAL, annotations, {})["spec"]
    env: dict[str, str] = {}
    for var in spec["template"]["spec"]["containers"][0]["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            path = var["valueFrom"]["fieldRef"]["fieldPath"]
            key = re.fullmatch(r"metadata\.annotations\['(.+)'\]", path)
            assert key, path
            env[var["name"]] = spec["template"]["metadata"]["annotations"][key.group(1)]
    env["PRIVATEFM_DEVICE"] = "cpu"
    assert MergeJob.from_env(env) == job
    assert env["PRIVATEFM_RESULT_PATH"] == spec["template"]["spec"]["containers"][0]["terminationMessagePath"]


@pytest.mark.parametrize(("old", "new", "patch"), [
    ({"a": 1, "b": 2}, {"a": 1, "b": 3}, {"b": 3}),
    ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),                                 # a cleared field is sent as null
    ({"d": {"x": 1, "y": 2}}, {"d": {"x": 1}}, {"d": {"y": None}}),
    ({"d": {"x": 1}}, {"d": {"x": 1}, "e": [1]}, {"e": [1]}),
    ({"l": [1, 2]}, {"l": [2]}, {"l": [2]}),                                    # lists are replaced whole
    ({}, {}, {}),
])
def test_status_writes_are_merge_patches_that_clear_what_is_gone(old: dict[str, Any], new: dict[str, Any],
                                                                 patch: dict[str, Any]) -> None:
    assert merge_patch(old, new) == patch


def test_crd_reinstalled_only_for_a_new_established_uid() -> None:
    seen: dict[str, str] = {}
    assert not decisions.crd_reinstalled(seen, "a", "u1", True)   # first sight
    assert not decisions.crd_reinstalled(seen, "a", "u1", True)   # same CRD
    assert not decisions.crd_reinstalled(seen, "a", "u2", False)  # re-created, not yet established
    assert decisions.crd_reinstalled(seen, "a", "u2", True)
    assert not decisions.crd_reinstalled(seen, "a", "u2", True)   # once
    assert seen == {"a": "u2"}


# ---- self-healing ----------------------------------------------------------------------------
def test_checks_are_staggered_over_the_interval_and_due_once_per_slot() -> None:
    hour, start = timedelta(hours=1), datetime(2026, 1, 1, tzinfo=UTC)
    uids = [naming.ns_uid(f"learner-{i}") for i in range(200)]
    # Each learner is due at its own moment: over one hour, never more than a few at once.
    first_due = []
    for uid in uids:
        minute = next(m for m in range(1, 61) if decisions.check_due(uid, start, hour, start + timedelta(minutes=m)))
        first_due.append(minute)
    assert len(set(first_due)) > 40 and max(first_due.count(m) for m in set(first_due)) < 15
    uid = uids[0]
    now = start + timedelta(hours=5)
    assert decisions.check_due(uid, None, hour, now)
    assert not decisions.check_due(uid, now, hour, now + timedelta(seconds=1))
    assert decisions.check_due(uid, now, hour, now + hour)


@pytest.mark.parametrize(("manifest_sha", "listed", "stored", "checksums", "expected"), [
    (None, None, {"a": 1}, None, [("ManifestMissing", "manifest.json")]),
    ("f" * 64, {}, {"a": 1}, None, [("ChecksumMismatch", "manifest.json")]),
    ("e" * 64, {"a": 1, "b": 2}, {"a": 1, "b": 2}, None, []),
    ("e" * 64, {"a": 1, "b": 2}, {"a": 1}, None, [("FileMissing", "b")]),
    ("e" * 64, {"a": 1, "b": 2}, {"a": 1, "b": 3}, None, [("SizeMismatch", "b")]),
    ("e" * 64, {"a": 1, "b": 2}, {"a": 1, "b": 2}, {"b": "store checksum mismatch"}, [("ChecksumMismatch", "b")]),
    ("e" * 64, {"a": 1, "b": 2}, {"a": 1}, {"b": "store checksum mismatch"}, [("FileMissing", "b")]),
    ("e" * 64, {"a": 1, "b": 2}, {"b": 5}, None, [("FileMissing", "a"), ("SizeMismatch", "b")]),
])
def test_cheap_check_findings(manifest_sha: str | None, listed: dict[str, int] | None, stored: dict[str, int],
                              checksums: dict[str, str] | None, expected: list[tuple[str, str]]) -> None:
    found = decisions.cheap_findings("e" * 64, manifest_sha, listed, stored, checksums)
    assert [(f.reason.value, f.file) for f in found] == expected


def _checkpoint(version: int, base: int = 1) -> Checkpoint:
    return Checkpoint(version=version, uri=f"s3://b/learners/x/checkpoints/v{version}", manifest_sha256="a" * 64,
                      base_version=base)


def test_a_failed_check_takes_the_checkpoint_out_and_a_newer_version_heals_it() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    status = LearnerNamespaceStatus(current_checkpoint=_checkpoint(3), last_assigned_version=3)
    finding = decisions.Finding(decisions.Corruption.FILE_MISSING, "model-1.safetensors", "gone")
    failed = decisions.integrity_checked(status, 3, [finding], now)
    assert failed.current_checkpoint is None and failed.integrity is not None
    assert (failed.integrity.failed_version, failed.integrity.reason, failed.integrity.file) == (
        3, "FileMissing", "model-1.safetensors")
    # A check of an older version does not touch the current one.
    assert decisions.integrity_checked(status, 2, [finding], now).current_checkpoint == status.current_checkpoint
    healed = decisions.advance_checkpoint(failed, _checkpoint(4))
    assert healed.current_checkpoint == _checkpoint(4) and healed.integrity is not None
    assert healed.integrity.failed_version is None and healed.integrity.checked_at == now
    passed = decisions.integrity_checked(status, 3, [], now, deep=True)
    assert passed.current_checkpoint == status.current_checkpoint and passed.integrity is not None
    assert (passed.integrity.deep_checked_version, passed.integrity.failed_version) == (3, None)


def test_fallback_reasons_in_order_and_a_pinned_base_never_lag_falls_back() -> None:
    lagging = LearnerNamespaceStatus(current_checkpoint=_checkpoint(2), version_lag=4)
    assert decisions.fallback_reason(lagging, False, 3, None).reason == "VersionLag"  # type: ignore[union-attr]
    assert decisions.fallback_reason(lagging, True, 3, None) is None
    assert decisions.fallback_reason(lagging.model_copy(update={"version_lag": 3}), False, 3, None) is None
    requested = decisions.fallback_reason(lagging, True, 3, "now")
    assert requested is not None and requested.reason == "Requested"
    handled = lagging.model_copy(update={"recovery": RecoveryStatus(id=1, reason="Requested", request="now")})
    assert decisions.fallback_reason(handled, True, 3, "now") is None  # that request was answered
    corrupt = lagging.model_copy(update={"integrity": IntegrityStatus(failed_version=2, reason="FileMissing")})
    assert decisions.fallback_reason(corrupt, True, 3, "now").reason == "Corruption"  # type: ignore[union-attr]


def test_a_fallback_retries_with_a_doubling_delay_then_gives_up_until_the_spec_or_request_changes() -> None:
    now, backoff = datetime(2026, 1, 1, tzinfo=UTC), timedelta(seconds=60)
    why = decisions.Failure("Corruption", "v2 failed")
    rec = decisions.start_recovery(None, why, 5, None, now)
    assert rec is not None and (rec.id, rec.merge, rec.attempts) == (1, "fallback-1-1", 0)
    assert decisions.start_recovery(rec, why, 5, None, now) is None  # one at a time
    rec = decisions.recovery_after_attempt(rec, False, 3, backoff, now)
    assert (rec.merge, rec.attempts, rec.next_attempt_at) == ("fallback-1-2", 1, now + backoff)
    rec = decisions.recovery_after_attempt(rec, False, 3, backoff, now)
    assert (rec.merge, rec.attempts, rec.next_attempt_at) == ("fallback-1-3", 2, now + 2 * backoff)
    rec = decisions.recovery_after_attempt(rec, False, 3, backoff, now)
    assert rec.failed_at == now and rec.attempts == 3 and not decisions.recovery_active(rec)
    assert decisions.start_recovery(rec, why, 5, None, now) is None  # Stalled: same spec, same request
    again = decisions.start_recovery(rec, why, 6, None, now)
    assert again is not None and (again.id, again.merge) == (2, "fallback-2-1")
    assert decisions.start_recovery(rec, why, 5, "please", now) is not None
    done = decisions.recovery_after_attempt(again, True, 3, backoff, now)
    assert done.completed_at == now and not decisions.recovery_active(done)


def test_learner_status_shows_recovery_corruption_and_a_fallback_that_gave_up() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    facts = decisions.LearnerFacts(generation=1, now=now, ns_uid="abc", namespace="lrn-x", latest_base=1,
                                   checkpoints_uri="s3://b/learners/x/checkpoints")

    def cond(status: LearnerNamespaceStatus, kind: str) -> tuple[str, str]:
        c = conditions.find(status.conditions, kind)
        assert c is not None
        return c.status.value, c.reason

    corrupt = LearnerNamespaceStatus(integrity=IntegrityStatus(failed_version=2, reason="SizeMismatch",
                                                               file="model-1.safetensors", message="short"))
    out = decisions.learner_status(facts, corrupt)
    assert out.phase == LearnerPhase.DEGRADED and cond(out, "Degraded") == ("True", "SizeMismatch")
    assert cond(out, "Ready") == ("False", "SizeMismatch")
    recovering = corrupt.model_copy(update={"recovery": RecoveryStatus(id=1, reason="Corruption",
                                                                       merge="fallback-1-1")})
    out = decisions.learner_status(facts, recovering)
    assert out.phase == LearnerPhase.RECOVERING and cond(out, "Recovering") == ("True", "Corruption")
    assert cond(out, "Reconciling") == ("True", "Corruption") and cond(out, "Stalled")[0] == "False"
    gave_up = corrupt.model_copy(update={"recovery": RecoveryStatus(id=1, reason="Corruption", attempts=3,
                                                                    failed_at=now)})
    out = decisions.learner_status(facts, gave_up)
    assert out.phase == LearnerPhase.FAILED and cond(out, "Stalled") == ("True", "FallbackFailed")
    assert cond(out, "Recovering") == ("False", "FallbackFailed")


@pytest.mark.parametrize(("log", "upto", "expected"), [
    ([], None, []),
    ([(1, AdapterMode.CUMULATIVE), (2, AdapterMode.INCREMENTAL), (3, AdapterMode.INCREMENTAL)], None, [1, 2, 3]),
    ([(1, AdapterMode.CUMULATIVE), (2, AdapterMode.CUMULATIVE), (3, AdapterMode.INCREMENTAL)], None, [2, 3]),
    ([(1, AdapterMode.CUMULATIVE), (2, AdapterMode.CUMULATIVE), (3, AdapterMode.INCREMENTAL)], 2, [2]),
    ([(1, AdapterMode.INCREMENTAL), (2, AdapterMode.INCREMENTAL)], None, [1, 2]),
    ([(1, AdapterMode.CUMULATIVE)], 7, []),
])
def test_a_run_folds_the_log_from_its_newest_cumulative_adapter(log: list[tuple[int, AdapterMode]],
                                                                 upto: int | None, expected: list[int]) -> None:
    assert decisions.adapters_to_fold(log, upto) == expected


def test_plan_failure_for_a_missing_adapter_except_a_reclone() -> None:
    assert decisions.plan_failure("m", 1, True, None, "p", reclone=True) is None
    assert decisions.plan_failure("m", 1, True, None, "p").reason == "NoAdapter"  # type: ignore[union-attr]
    failure = decisions.plan_failure("m", 1, True, None, "p", requested_adapter=7, reclone=True)
    assert failure is not None and "no adapter 7" in failure.message


def test_merge_verify_and_scheduled_pods_mount_the_store_ca_bundle_when_set() -> None:
    with_ca = Settings(s3_endpoint="https://s3.corp", merge_image="example/merge:1",
                       ca_bundle_configmap="corp-ca", ca_bundle_key="bundle.pem")
    pods = {"manual": builders.merge_job(LEARNER, with_ca, "run", MergeTrigger.MANUAL, {}, {})["spec"]["template"],
            "scheduled": builders.cronjob(LEARNER, with_ca)["spec"]["jobTemplate"]["spec"]["template"],
            "verify": builders.verify_job(LEARNER, with_ca, "verify-v1-1", 1, "s3://b/x", "s")["spec"]["template"]}
    for kind, pod in pods.items():
        spec = pod["spec"]
        assert {"name": "ca-bundle", "configMap": {"name": "corp-ca", "items": [{"key": "bundle.pem",
                                                                                   "path": "ca.crt"}]}} \
            in spec["volumes"], kind
        (container,) = spec["containers"]
        assert {"name": "ca-bundle", "mountPath": "/etc/privatefm/ca", "readOnly": True} in container["volumeMounts"]
        assert {"name": "AWS_CA_BUNDLE", "value": "/etc/privatefm/ca/ca.crt"} in container["env"], kind
    plain = builders.merge_job(LEARNER, SETTINGS, "run", MergeTrigger.MANUAL, {}, {})["spec"]["template"]["spec"]
    assert [v["name"] for v in plain["volumes"]] == ["tmp"]
    assert not [e for e in plain["containers"][0]["env"] if e["name"] == "AWS_CA_BUNDLE"]


def test_a_learner_whose_history_could_not_be_read_is_not_ready_yet() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    facts = decisions.LearnerFacts(generation=1, now=now, ns_uid="abc", namespace="lrn-x", latest_base=1,
                                   store_problem="read timeout", checkpoints_uri="s3://b/learners/x/checkpoints")
    out = decisions.learner_status(facts, LearnerNamespaceStatus())
    ready = conditions.find(out.conditions, "Ready")
    reconciling = conditions.find(out.conditions, "Reconciling")
    assert ready is not None and (ready.status.value, ready.reason) == ("False", "ReadingHistory")
    assert reconciling is not None and reconciling.status.value == "True"
    known = LearnerNamespaceStatus(last_assigned_version=2)  # history known: a short outage leaves it Ready
    ready = conditions.find(decisions.learner_status(facts, known).conditions, "Ready")
    assert ready is not None and ready.status.value == "True"
