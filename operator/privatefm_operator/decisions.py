"""Pure decisions, evaluated over plain inputs and table-tested without a cluster."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from privatefm_merge.adapter_log import AdapterMode, fold
from privatefm_merge.contract import MergeResult

from privatefm_operator import conditions, naming
from privatefm_operator.api import (
    VERSION_ASSIGNMENTS_KEPT,
    Checkpoint,
    Condition,
    DeletionStatus,
    Guardian,
    GuardianKind,
    IntegrityStatus,
    LearnerNamespaceStatus,
    LearnerPhase,
    MergePhase,
    RecoveryStatus,
    VersionAssignment,
)


def next_version(last_assigned: int | None, current: int | None) -> int:
    """Versions only ever increase, even past runs that failed or were lost."""
    return max(last_assigned or 0, current or 0) + 1


def version_lag(latest_base: int | None, checkpoint_base: int | None) -> int | None:
    if latest_base is None or checkpoint_base is None:
        return None
    return max(latest_base - checkpoint_base, 0)


def trusted_checkpoint(status: LearnerNamespaceStatus, checkpoints_uri: str | None) -> Checkpoint | None:
    """The current checkpoint, unless it points anywhere but ``<checkpoints_uri>/v<version>``, this
    learner's own place in the store (a status written by someone else). None when unknown."""
    current = status.current_checkpoint
    if current is None or checkpoints_uri is None or current.uri == f"{checkpoints_uri}/v{current.version}":
        return current
    return None


@dataclass(frozen=True)
class History:
    """What the store remembers of a learner (``Storage.learner_history``)."""

    highest_version: int | None
    merges: tuple[dict[str, Any], ...] = ()


def recovered(status: LearnerNamespaceStatus, history: History | None, checkpoints_uri: str | None
              ) -> LearnerNamespaceStatus:
    """A status without a version counter (a CR created anew for an existing learner, or a brand-new
    learner) takes the counter and, when it has none, the newest verified checkpoint from the store's
    history, so versions never repeat and the learner keeps its model. The counter is 0 when there
    is no history: planning waits until it is set."""
    if history is None or checkpoints_uri is None or status.last_assigned_version is not None:
        return status
    best: Checkpoint | None = None
    for record in history.merges:
        try:
            candidate = Checkpoint(version=record["version"], uri=f"{checkpoints_uri}/v{record['version']}",
                                   manifest_sha256=record["manifestSha256"], base_version=record["baseVersion"],
                                   adapter_seq=record.get("adapterSeq"), verified_at=record.get("at"))
        except (KeyError, TypeError, ValueError):
            continue
        if best is None or candidate.version > best.version:
            best = candidate
    current = status.current_checkpoint or best
    highest = max(history.highest_version or 0, best.version if best else 0, current.version if current else 0)
    return status.model_copy(update={"last_assigned_version": highest, "current_checkpoint": current})


def allocate_version(status: LearnerNamespaceStatus, merge_uid: str) -> LearnerNamespaceStatus:
    """The learner's status with the next version handed to the run ``merge_uid`` (the counter only
    grows), or unchanged when that run already has one: a run that was handed a version, but stopped
    before it recorded it, gets the same one again instead of leaving a gap."""
    if assigned_version(status, merge_uid) is not None:
        return status
    current = status.current_checkpoint.version if status.current_checkpoint else None
    version = next_version(status.last_assigned_version, current)
    kept = [*status.version_assignments, VersionAssignment(version=version, merge_uid=merge_uid)]
    return status.model_copy(update={"last_assigned_version": version,
                                     "version_assignments": kept[-VERSION_ASSIGNMENTS_KEPT:]})


def assigned_version(status: LearnerNamespaceStatus, merge_uid: str) -> int | None:
    return next((a.version for a in status.version_assignments if a.merge_uid == merge_uid), None)


def advance_checkpoint(status: LearnerNamespaceStatus, checkpoint: Checkpoint,
                       checkpoints_uri: str | None = None) -> LearnerNamespaceStatus:
    """The learner's status with ``checkpoint`` current, unless a newer (trusted) one already is."""
    trusted = trusted_checkpoint(status, checkpoints_uri)
    current = trusted.version if trusted else None
    if not should_advance(current, checkpoint.version):
        return status
    update: dict[str, Any] = {"current_checkpoint": checkpoint}
    integrity = status.integrity
    if integrity is not None and integrity.failed_version is not None and checkpoint.version > integrity.failed_version:
        update["integrity"] = integrity.model_copy(update={  # a newer verified version heals it
            "failed_version": None, "reason": None, "file": None, "message": None})
    return status.model_copy(update=update)


# ---- the learner's observed state ------------------------------------------------------------
@dataclass(frozen=True)
class Failure:
    reason: str
    message: str


class Claim(StrEnum):
    """What a LearnerNamespace may do with the namespace its learnerId maps to."""

    CREATE = "Create"    # it does not exist yet
    OWN = "Own"          # it is this CR's already
    ADOPT = "Adopt"      # ours, but recorded for a CR that no longer exists (a CRD reinstall, a re-sync)
    IN_USE = "InUse"     # another live LearnerNamespace has the same learnerId
    FOREIGN = "Foreign"  # a namespace of that name that this operator did not make


def namespace_claim(labels: dict[str, str] | None, lns_name: str, owner_alive: bool) -> Claim:
    """``labels`` of the existing namespace (None: there is none); ``owner_alive``: the CR its
    learner label names exists and is not being deleted. Labels of a namespace are written only
    by cluster admins and this operator, never by a tenant."""
    if labels is None:
        return Claim.CREATE
    if labels.get(naming.LABEL_MANAGED_BY) != naming.MANAGED_BY:
        return Claim.FOREIGN
    if labels.get(naming.LABEL_LEARNER) == lns_name:
        return Claim.OWN
    return Claim.IN_USE if owner_alive else Claim.ADOPT


def made_by(namespace: dict[str, Any], manager: str) -> bool:
    """Whether every field manager of a namespace the operator has just applied, believing it new, is
    ``manager``: the apply created it. Another manager's entry means the namespace existed (someone
    created it after the operator last saw that the name was free), and the apply took it over."""
    managers = {entry.get("manager") for entry in namespace["metadata"].get("managedFields") or []}
    return managers <= {manager}


def claim_failure(claim: Claim, namespace: str, owner: str | None) -> Failure | None:
    if claim == Claim.IN_USE:
        return Failure("LearnerIdInUse", f"namespace {namespace} belongs to LearnerNamespace {owner}, which has the "
                                         "same learnerId; this one touches nothing until that one is gone")
    if claim == Claim.FOREIGN:
        return Failure("NamespaceConflict", f"namespace {namespace} exists and is not managed by privatefm")
    return None


def is_learner_namespace(namespace: str, labels: dict[str, str], expected: str, ns_uid: str) -> bool:
    """A namespace belongs to a learner only when it is the one that learner's identity maps to,
    and the labels this operator put there agree."""
    return (namespace == expected and labels.get(naming.LABEL_MANAGED_BY) == naming.MANAGED_BY
            and labels.get(naming.LABEL_NS_UID) == ns_uid)


def owned_by(metadata: dict[str, Any], kind: str, uid: str) -> bool:
    """Whether an object has an ownerReference to the object of ``kind`` with this ``uid``."""
    return bool(uid) and any(ref.get("kind") == kind and ref.get("uid") == uid
                             for ref in metadata.get("ownerReferences") or [])


@dataclass(frozen=True)
class LearnerFacts:
    """What one reconcile of a LearnerNamespace observed. Empty problems mean "none"."""

    generation: int | None
    now: datetime
    spec_problem: str = ""  # the spec cannot be read, or the API server refused what it asks for
    claim_problem: Failure | None = None  # the learner's namespace is not this CR's to manage
    ns_uid: str | None = None
    namespace: str | None = None
    merge_schedule: str | None = None  # the CronJob's schedule, H fields and the default window resolved
    latest_base: int | None = None
    base_problem: str = ""  # the base model cannot be used
    store_problem: str = ""  # the store could not be read: what it holds is unknown
    store_grace: timedelta = timedelta(minutes=2)  # how long an unreachable store leaves Ready alone
    checkpoints_uri: str | None = None  # where this learner's checkpoints live (s3://bucket/learners/<nsUid>/checkpoints)
    history: History | None = None  # read from the store only for a status that has never seen a version
    max_lag: int = 3
    scoped_store: bool = True  # False: runs get the operator's shared store keys (insecure mode)


def base_problem(model: str, pinned: int | None, pinned_found: bool, latest: int | None) -> str:
    """Why the learner's base model cannot be used ("" when it can)."""
    if pinned is not None and not pinned_found:
        return f"base model {model} v{pinned} is not in the store"
    if pinned is None and latest is None:
        return f"base model {model} has no published version in the store"
    return ""


def learner_status(facts: LearnerFacts, old: LearnerNamespaceStatus) -> LearnerNamespaceStatus:
    """The learner's phase, lag and conditions from what was observed.

    Evaluated against the freshest status (``old``), so the lag always matches the checkpoint that
    is current when it is written. The counter and the checkpoint are carried over untouched.
    The first matching row decides Ready and the phase:

    | observed                               | phase    | Ready | Stalled | reason             |
    |----------------------------------------|----------|-------|---------|--------------------|
    | the spec is invalid                    | Failed   | False | True    | InvalidSpec        |
    | the namespace is another's             | Failed   | False | True    | LearnerIdInUse / NamespaceConflict |
    | the base model is missing              | Failed   | False | True    | BaseModelNotFound  |
    | a fallback gave up                     | Failed   | False | True    | FallbackFailed     |
    | a fallback is under way                | Recovering | False | False | Corruption / VersionLag / Requested |
    | the store unreachable past the grace   | Degraded | False | False   | StoreUnreachable   |
    | its history unread (store unreachable) | Degraded | False | False   | ReadingHistory     |
    | the checkpoint failed a check          | Degraded | False | False   | the check's reason (*) |
    | the checkpoint lags too far            | Degraded | True  | False   | CheckpointVerified |
    | otherwise                              | Ready    | True  | False   | CheckpointVerified / Provisioned |

    (*) ChecksumMismatch, SizeMismatch, FileMissing or ManifestMissing. Degraded names the failed
    check (reason and file) before the lag; Recovering is True while a
    fallback is under way.
    """
    gen, at = facts.generation, facts.now
    old = recovered(old, facts.history, facts.checkpoints_uri)
    # status.nsUid is immutable once set (an admission policy holds it): a differing old value stays
    # for people to see, and the operator goes by the identity it derives.
    known = {"ns_uid": old.ns_uid or facts.ns_uid, "namespace": facts.namespace,
             "merge_schedule": facts.merge_schedule} if facts.namespace else {}
    stall = Failure("InvalidSpec", facts.spec_problem) if facts.spec_problem else facts.claim_problem
    if stall is not None:
        return old.model_copy(update={**known, "phase": LearnerPhase.FAILED, "conditions": conditions.merge(
            old.conditions, conditions.kstatus(gen, at, ready=False, reconciling=False, stalled=True,
                                               reason=stall.reason, message=stall.message[:2000]))})
    # With the store unreachable, the latest base version is what was last seen.
    latest = old.base_model_latest_version if facts.store_problem else facts.latest_base
    current = trusted_checkpoint(old, facts.checkpoints_uri)
    forged = old.current_checkpoint.uri if old.current_checkpoint is not None and current is None else ""
    lag = version_lag(latest, current.base_version if current else None)
    degraded = lag is not None and lag > facts.max_lag
    store_down = bool(facts.store_problem) and at - unavailable_since(old, at) >= facts.store_grace
    integrity, recovery = old.integrity, old.recovery
    corrupt = integrity is not None and integrity.failed_version is not None
    reconciling = False
    if facts.base_problem:
        phase, ready, stalled, reason, message = (LearnerPhase.FAILED, False, True, "BaseModelNotFound",
                                                  facts.base_problem)
    elif recovery is not None and recovery.failed_at is not None:
        phase, ready, stalled, reason = LearnerPhase.FAILED, False, True, "FallbackFailed"
        message = (f"fallback {recovery.id} ({recovery.reason}) gave up after {recovery.attempts} failed merges; "
                   "a spec change or a new fallback request starts over")
    elif recovery_active(recovery):
        assert recovery is not None
        phase, ready, stalled, reason, reconciling = LearnerPhase.RECOVERING, False, False, recovery.reason, True
        message = f"fallback {recovery.id} under way ({recovery.merge}): {recovery.message or ''}"
    elif store_down:
        phase, ready, stalled, reason = LearnerPhase.DEGRADED, False, False, "StoreUnreachable"
        message = f"the store has been unreachable for more than {facts.store_grace}: {facts.store_problem}"
    elif facts.store_problem and old.last_assigned_version is None and old.current_checkpoint is None:
        # Its history (a re-created CR's checkpoints) could not be read yet: not Ready until it is.
        phase, ready, stalled, reason, reconciling = LearnerPhase.DEGRADED, False, False, "ReadingHistory", True
        message = f"the learner's history in the store could not be read yet: {facts.store_problem}"
    elif corrupt:
        assert integrity is not None
        phase, ready, stalled, reason = LearnerPhase.DEGRADED, False, False, integrity.reason or "Corruption"
        message = f"checkpoint v{integrity.failed_version} failed an integrity check: {integrity.message}"
    else:
        phase = LearnerPhase.DEGRADED if degraded else LearnerPhase.READY
        ready, stalled = True, False
        reason = "CheckpointVerified" if current else "Provisioned"
        message = (f"namespace {facts.namespace} provisioned; "
                   + (f"checkpoint v{current.version} verified" if current else "no checkpoint yet"))
    if corrupt:
        assert integrity is not None
        degraded_why = (integrity.reason or "Corruption", f"{integrity.file}: {integrity.message}")
    elif degraded:
        degraded_why = ("VersionLag", f"checkpoint is {lag} base versions behind (max {facts.max_lag})")
    else:
        degraded_why = ("WithinLag", "")
    recovering = recovery_active(recovery)
    new = [*conditions.kstatus(gen, at, ready=ready, reconciling=reconciling, stalled=stalled, reason=reason,
                               message=message),
           conditions.condition(conditions.DEGRADED, corrupt or degraded, *degraded_why, gen, at),
           conditions.condition(conditions.RECOVERING, recovering, recovery.reason if recovering and recovery
                                else ("FallbackFailed" if recovery and recovery.failed_at else "Idle"),
                                message if recovering else "", gen, at),
           conditions.condition(conditions.CHECKPOINT_TRUSTED, not forged,
                                "UnexpectedCheckpointURI" if forged else "ExpectedLayout",
                                f"currentCheckpoint points at {forged}, not at this learner's checkpoints; it is "
                                "ignored" if forged else "", gen, at),
           conditions.condition(conditions.STORE_AVAILABLE, not facts.store_problem,
                                "StoreUnreachable" if facts.store_problem else "StoreReachable",
                                facts.store_problem[:2000], gen, at),
           conditions.condition(conditions.SCOPED_STORE_CREDENTIALS, facts.scoped_store,
                                "SessionPolicy" if facts.scoped_store else "SharedCredentials",
                                "each run gets temporary store credentials scoped to its own prefixes"
                                if facts.scoped_store else "INSECURE: merge pods get the operator's own store keys; "
                                "learners are not isolated from each other in the store", gen, at)]
    return old.model_copy(update={
        **known, "phase": phase, "conditions": conditions.merge(old.conditions, new),
        "base_model_latest_version": latest, "version_lag": lag})


def first_status(old: LearnerNamespaceStatus, generation: int | None, now: datetime) -> LearnerNamespaceStatus | None:
    """The status written as soon as a generation is first seen, before any slow step (creating the
    namespace, reading the store): Reconciling=True and observedGeneration, so no GitOps tool reads a
    learner that is still being set up as Current. None once this generation has been seen.

    A new learner gets phase Provisioning and all three kstatus conditions (Ready=False); a learner
    whose spec changed keeps its phase and Ready, and only turns Reconciling on."""
    if old.observed_generation == generation and old.conditions:
        return None
    if conditions.find(old.conditions, conditions.READY) is None:
        new = conditions.kstatus(generation, now, ready=False, reconciling=True, stalled=False,
                                 reason="Provisioning", message="provisioning the learner's namespace")
        return old.model_copy(update={"phase": old.phase or LearnerPhase.PROVISIONING,
                                      "observed_generation": generation,
                                      "conditions": conditions.merge(old.conditions, new)})
    new = [conditions.condition(conditions.RECONCILING, True, "SpecChanged",
                                f"reconciling generation {generation}", generation, now)]
    return old.model_copy(update={"observed_generation": generation,
                                  "conditions": conditions.merge(old.conditions, new)})


def unavailable_since(old: LearnerNamespaceStatus, now: datetime) -> datetime:
    """When the store became unreachable: the transition time of StoreAvailable=False, or now."""
    cond = conditions.find(old.conditions, conditions.STORE_AVAILABLE)
    return cond.last_transition_time if cond is not None and cond.status.value == "False" else now


def skip_invalid_spec(old: LearnerNamespaceStatus, generation: int | None) -> bool:
    """A spec the API server refused is not tried again until it changes (a new generation)."""
    stalled = conditions.find(old.conditions, conditions.STALLED)
    return (stalled is not None and stalled.status.value == "True" and stalled.reason == "InvalidSpec"
            and stalled.observed_generation == generation)


# ---- planning a run --------------------------------------------------------------------------
def adapters_to_fold(log: list[tuple[int, AdapterMode]], upto: int | None) -> list[int]:
    """The adapter sequence numbers a run folds: the log up to ``upto`` (default all of it), from
    its newest cumulative adapter on. Empty when there is none, or ``upto`` is not in the log."""
    if upto is not None and upto not in {seq for seq, _ in log}:
        return []
    return fold([(seq, mode) for seq, mode in log if upto is None or seq <= upto])


def plan_failure(model: str, base_version: int | None, base_found: bool, adapter_seq: int | None,
                 adapters_prefix: str, requested_adapter: int | None = None, reclone: bool = False) -> Failure | None:
    """Why a run cannot start, or None when it can. Checked before any version is spent. A
    fallback of a learner without adapters is a re-clone of the base, which needs none."""
    if base_version is None or not base_found:
        which = f"v{base_version}" if base_version is not None else "(no published version)"
        return Failure("BaseModelNotFound", f"base model {model} {which} is not in the store")
    if requested_adapter is not None and adapter_seq is None:
        return Failure("NoAdapter", f"no adapter {requested_adapter} under {adapters_prefix}/")
    if adapter_seq is None and not reclone:
        return Failure("NoAdapter", f"no adapter under {adapters_prefix}/")
    return None


def base_version_for_run(requested: int | None, current_checkpoint_base: int | None, pinned: int | None,
                         latest: int | None) -> int | None:
    """Which base a run merges onto: as requested, else the learner's current base, else pinned, else latest."""
    for candidate in (requested, current_checkpoint_base, pinned, latest):
        if candidate is not None:
            return candidate
    return None


def should_advance(current: int | None, candidate: int) -> bool:
    """currentCheckpoint only moves forward: an older run finishing late never rolls it back."""
    return current is None or candidate > current


@dataclass(frozen=True)
class JobOutcome:
    phase: MergePhase
    reason: str
    message: str
    result: MergeResult | None = None
    stalled: bool = False  # Pending for longer than the pending timeout


FINISHED = ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget")


def job_finished(job_status: dict[str, Any]) -> bool:
    """Only a finished Job has a result worth reading."""
    return any(c.get("type") in FINISHED and c.get("status") == "True" for c in job_status.get("conditions") or [])


def job_outcome(job_status: dict[str, Any], termination_message: str | None) -> JobOutcome:
    """Reads a Job's status plus its pod's termination message (the merge result)."""
    conditions = {c.get("type"): c for c in job_status.get("conditions") or [] if c.get("status") == "True"}
    result: MergeResult | None = None
    parse_error = ""
    if termination_message:
        try:
            result = MergeResult.from_json(termination_message)
        except Exception as err:  # a pod may write anything there
            parse_error = f"unreadable merge result: {err}"
    if "Complete" in conditions or "SuccessCriteriaMet" in conditions:
        if result is None or result.status != "Succeeded":
            return JobOutcome(MergePhase.FAILED, "ResultMissing",
                              parse_error or "the merge pod exited 0 without a success result", result)
        return JobOutcome(MergePhase.SUCCEEDED, "Merged", "merge pod reported success", result)
    failed = conditions.get("Failed") or conditions.get("FailureTarget")
    if failed:
        if result is not None and result.status == "Failed":
            return JobOutcome(MergePhase.FAILED, str(result.reason or "MergeFailed"), result.message or "", result)
        return JobOutcome(MergePhase.FAILED, str(failed.get("reason") or "JobFailed"),
                          parse_error or failed.get("message") or "the merge Job failed", result)
    if job_status.get("active") or job_status.get("ready"):
        # Active counts pending pods too: only the pods themselves say whether one runs (pod_progress).
        return JobOutcome(MergePhase.PENDING, "Pending", "the merge Job has a pod that is not running yet")
    return JobOutcome(MergePhase.PENDING, "Pending", "waiting for the merge pod")


def _when(text: Any) -> datetime | None:
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def pod_progress(job: dict[str, Any], pods: list[dict[str, Any]], now: datetime, pending_timeout: timedelta
                 ) -> JobOutcome:
    """An unfinished run's state from its Job's pods: Running only while a pod really runs.

    | the pods                                   | phase   | reason                            | stalled            |
    |--------------------------------------------|---------|-----------------------------------|--------------------|
    | one is Running                             | Running | Running                           | no                 |
    | the newest has PodScheduled=False          | Pending | the scheduler's (Unschedulable)   | after the timeout  |
    | the newest waits on a container            | Pending | the kubelet's (ImagePullBackOff)  | after the timeout  |
    | the newest is Pending otherwise            | Pending | PodPending                        | after the timeout  |
    | none yet                                   | Pending | PodNotCreated                     | after the timeout  |

    The timeout counts from when the pod became unschedulable (the condition's transition time),
    or from its creation, or (no pod yet) from when the Job started."""
    live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
    running = [p for p in live if (p.get("status") or {}).get("phase") == "Running"]
    if running:
        pod = running[0]
        node = (pod.get("spec") or {}).get("nodeName") or "a node"
        return JobOutcome(MergePhase.RUNNING, "Running", f"pod {pod['metadata']['name']} is running on {node}")
    job_meta, job_status = job.get("metadata") or {}, job.get("status") or {}
    pending = sorted((p for p in live if (p.get("status") or {}).get("phase") in (None, "Pending")),
                     key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    if not pending:
        since = _when(job_status.get("startTime")) or _when(job_meta.get("creationTimestamp")) or now
        reason, message = "PodNotCreated", f"Job {job_meta.get('name', '')} has not created a pod yet"
    else:
        pod = pending[-1]
        name, status = pod["metadata"]["name"], pod.get("status") or {}
        since = _when(pod["metadata"].get("creationTimestamp")) or now
        scheduled = next((c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), None)
        waiting = next((cs["state"]["waiting"] for cs in status.get("containerStatuses") or []
                        if (cs.get("state") or {}).get("waiting")), None)
        if scheduled is not None and scheduled.get("status") == "False":
            since = _when(scheduled.get("lastTransitionTime")) or since
            reason = str(scheduled.get("reason") or "Unschedulable")
            message = f"pod {name} cannot be scheduled: {scheduled.get('message') or reason}"
        elif waiting is not None and waiting.get("reason"):
            reason = str(waiting["reason"])
            message = f"pod {name} is waiting: {reason}" + (f": {waiting['message']}" if waiting.get("message") else "")
        else:
            reason, message = "PodPending", f"pod {name} is pending"
    if now - since >= pending_timeout:
        return JobOutcome(MergePhase.PENDING, reason, f"{message} (pending for more than {pending_timeout})",
                          stalled=True)
    return JobOutcome(MergePhase.PENDING, reason, message)


def merge_conditions(phase: MergePhase, reason: str, message: str, generation: int | None, at: datetime,
                     stalled: bool = False) -> list[Condition]:
    """The kstatus conditions of an AdapterMerge in ``phase``: every phase carries all three.

    | phase                     | Ready | Reconciling | Stalled | kstatus    | Argo CD     |
    |---------------------------|-------|-------------|---------|------------|-------------|
    | Pending, Running          | False | True        | False   | InProgress | Progressing |
    | Pending past the timeout  | False | False       | True    | Failed     | Degraded    |
    | Succeeded                 | True  | False       | False   | Current    | Healthy     |
    | Failed                    | False | False       | True    | Failed     | Degraded    |
    """
    if phase == MergePhase.SUCCEEDED:
        ready, reconciling, stalled = True, False, False
    elif phase == MergePhase.FAILED:
        ready, reconciling, stalled = False, False, True
    else:
        ready, reconciling = False, not stalled
    return conditions.kstatus(generation, at, ready=ready, reconciling=reconciling, stalled=stalled, reason=reason,
                              message=message)


@dataclass(frozen=True)
class Acceptance:
    accepted: bool
    reason: str
    message: str


def accept_checkpoint(result: MergeResult, target_version: int, manifest_sha256: str, manifest_version: int | None,
                      bad_files: list[str]) -> Acceptance:
    """A checkpoint is accepted only when its manifest and every file check out against the claim."""
    if bad_files:
        return Acceptance(False, "VerificationFailed", "files do not match the manifest: " + ", ".join(bad_files))
    if result.manifest_sha256 != manifest_sha256:
        return Acceptance(False, "VerificationFailed",
                          f"manifest sha256 {manifest_sha256} differs from the pod's claim {result.manifest_sha256}")
    if manifest_version != target_version:
        return Acceptance(False, "VerificationFailed",
                          f"manifest is for version {manifest_version}, expected {target_version}")
    return Acceptance(True, "Verified", f"checkpoint v{target_version} verified")


# ---- guardian-approved deletion --------------------------------------------------------------
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text: str) -> timedelta:
    """A Go duration (``24h``, ``1h30m``, ``90s``), the form of spec.deletionDelay."""
    parts = _GO_DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Go duration: {text!r}")
    return timedelta(seconds=sum(float(n) * _GO_UNITS[u] for n, u in parts))


def approver(annotations: dict[str, str], guardians: list[Guardian]) -> str | None:
    """Who approved the deletion, if anyone may have. A User guardian must be listed by name. Group
    membership is not visible to the operator: the admission policy checks that whoever sets the
    annotation is in a listed group and writes their own username, so any value counts when a
    Group guardian is listed."""
    value = annotations.get(naming.APPROVAL_ANNOTATION, "").strip()
    if not value:
        return None
    if any(g.kind == GuardianKind.USER and g.name == value for g in guardians):
        return value
    return value if any(g.kind == GuardianKind.GROUP for g in guardians) else None


def deletion_progress(old: DeletionStatus | None, requested: datetime, approved_by: str | None, delay: timedelta,
                      now: datetime) -> DeletionStatus:
    """The deletion's state after looking at the approval once more.

    An approval counts from when the operator first saw it; removing it before deletion started
    revokes it. Once started, deletion goes on to the end: it cannot be half undone."""
    d = old or DeletionStatus(requested_at=requested)
    if d.started_at is not None:
        return d
    if approved_by is None:
        return d.model_copy(update={"approved_by": None, "approved_at": None, "not_before": None})
    approved_at = d.approved_at if d.approved_by == approved_by and d.approved_at else now
    requested_at = d.requested_at or requested
    return d.model_copy(update={"approved_by": approved_by, "approved_at": approved_at,
                                "not_before": max(requested_at, approved_at) + delay})


def deletion_due(d: DeletionStatus, now: datetime) -> bool:
    """Nothing is deleted before both an approval and the delay."""
    return d.started_at is not None or (d.approved_by is not None and d.not_before is not None
                                        and now >= d.not_before)


def deletion_status(old: LearnerNamespaceStatus, d: DeletionStatus, generation: int | None,
                    now: datetime) -> LearnerNamespaceStatus:
    """The learner's phase and conditions while it is being deleted."""
    if d.started_at is not None:
        phase, reason, message = LearnerPhase.DELETING, "Deleting", "deleting the namespace and the store prefix"
    elif d.approved_by is None:
        phase, reason = LearnerPhase.AWAITING_GUARDIAN, "AwaitingGuardian"
        message = f"deletion requested; a listed guardian must approve ({naming.APPROVAL_ANNOTATION})"
    else:
        phase, reason = LearnerPhase.AWAITING_GUARDIAN, "DeletionDelay"
        message = f"approved by {d.approved_by}; deletion runs at {d.not_before}"
    return old.model_copy(update={"phase": phase, "deletion": d, "conditions": conditions.merge(
        old.conditions, conditions.kstatus(generation, now, ready=False, reconciling=True, stalled=False,
                                           reason=reason, message=message))})


def crd_reinstalled(seen: dict[str, str], name: str, uid: str, established: bool) -> bool:
    """Whether this CRD event shows one of ours re-created since first seen (and records it).

    kopf learns which resources it serves from API discovery when a CRD event arrives; a CRD
    that comes back (uninstall and install, or a botched upgrade) can be announced before
    discovery lists it, and kopf then never serves it. A re-created, established CRD is the
    moment to restart the operator's kopf loop.
    """
    first = seen.setdefault(name, uid)
    if first == uid or not established:
        return False
    seen[name] = uid
    return True



# ---- integrity checks ------------------------------------------------------------------------
class Corruption(StrEnum):
    CHECKSUM_MISMATCH = "ChecksumMismatch"
    SIZE_MISMATCH = "SizeMismatch"
    FILE_MISSING = "FileMissing"
    MANIFEST_MISSING = "ManifestMissing"


@dataclass(frozen=True)
class Finding:
    """One way a checkpoint is not what its manifest says."""

    reason: Corruption
    file: str
    message: str


def check_due(ns_uid: str, last: datetime | None, interval: timedelta, now: datetime) -> bool:
    """Whether a periodic check of this learner is due. Each learner has its own slot within the
    interval (from its nsUid), so checks of many learners are spread out, never all at once; a
    check is due once the learner's latest slot began after its last check."""
    seconds = max(1, int(interval.total_seconds()))
    offset = int(ns_uid[:8], 16) % seconds if ns_uid else 0
    epoch = int(now.timestamp())
    slot = epoch - ((epoch - offset) % seconds)
    return last is None or last.timestamp() < slot


def cheap_findings(expected_manifest_sha256: str, manifest_sha256: str | None, listed: dict[str, int] | None,
                   stored: dict[str, int], checksum_problems: dict[str, str] | None = None,
                   manifest_name: str = "manifest.json") -> list[Finding]:
    """What a cheap check found, from the manifest's sha256 (None: missing), the sizes the manifest
    lists, the sizes the store holds, and the files whose checksum the store kept at upload no
    longer matches (with why). No model bytes are needed."""
    if manifest_sha256 is None or listed is None:
        return [Finding(Corruption.MANIFEST_MISSING, manifest_name, f"{manifest_name} is gone")]
    if manifest_sha256 != expected_manifest_sha256:
        return [Finding(Corruption.CHECKSUM_MISMATCH, manifest_name,
                        f"{manifest_name} has sha256 {manifest_sha256}, the verified one had "
                        f"{expected_manifest_sha256}")]
    found = []
    for name, size in sorted(listed.items()):
        if name not in stored:
            found.append(Finding(Corruption.FILE_MISSING, name, f"{name} is listed in the manifest but missing"))
        elif stored[name] != size:
            found.append(Finding(Corruption.SIZE_MISMATCH, name,
                                 f"{name} has {stored[name]} bytes, the manifest lists {size}"))
        elif checksum_problems and name in checksum_problems:
            found.append(Finding(Corruption.CHECKSUM_MISMATCH, name, f"{name}: {checksum_problems[name]}"))
    return found


def integrity_checked(status: LearnerNamespaceStatus, version: int, findings: list[Finding], now: datetime,
                      deep: bool = False) -> LearnerNamespaceStatus:
    """The status after a check of checkpoint ``version``. A failed check takes the checkpoint out
    of currentCheckpoint at once: a checkpoint that failed is never the verified current one."""
    old = status.integrity or IntegrityStatus()
    stamp = {"deep_checked_at": now, "deep_checked_version": version} if deep else \
        {"checked_at": now, "checked_version": version}
    update: dict[str, Any] = {}
    if findings:
        first = findings[0]
        more = f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""
        stamp.update(failed_version=version, reason=first.reason.value, file=first.file,
                     message=(first.message + more)[:1024])
        current = status.current_checkpoint
        if current is not None and current.version == version:
            update["current_checkpoint"] = None
    return status.model_copy(update={**update, "integrity": old.model_copy(update=stamp)})


# ---- fallback: re-clone from the base and replay the adapter log -----------------------------
class FallbackReason(StrEnum):
    CORRUPTION = "Corruption"
    VERSION_LAG = "VersionLag"
    REQUESTED = "Requested"


def fallback_reason(status: LearnerNamespaceStatus, pinned: bool, max_lag: int,
                    requested: str | None) -> Failure | None:
    """Why this learner should fall back now, if it should."""
    integrity, recovery = status.integrity, status.recovery
    if integrity is not None and integrity.failed_version is not None:
        return Failure(FallbackReason.CORRUPTION.value,
                       f"checkpoint v{integrity.failed_version} failed an integrity check: {integrity.reason} "
                       f"({integrity.file})")
    if requested and requested != (recovery.request if recovery else None):
        return Failure(FallbackReason.REQUESTED.value,
                       f"requested through {naming.FALLBACK_ANNOTATION} = {requested!r}")
    lag = status.version_lag
    if not pinned and lag is not None and lag > max_lag and status.current_checkpoint is not None:
        return Failure(FallbackReason.VERSION_LAG.value,
                       f"checkpoint is {lag} base versions behind (max {max_lag})")
    return None


def recovery_active(recovery: RecoveryStatus | None) -> bool:
    return recovery is not None and recovery.completed_at is None and recovery.failed_at is None


def start_recovery(old: RecoveryStatus | None, why: Failure | None, generation: int | None, requested: str | None,
                   now: datetime) -> RecoveryStatus | None:
    """A new fallback, when one should start: there is a reason, none is under way, and one that
    gave up is tried again only after a spec change or a new request."""
    if why is None or recovery_active(old):
        return None
    if old is not None and old.failed_at is not None and old.generation == generation \
            and (requested or None) == old.request:
        return None  # gave up on this spec and request: Stalled until either changes
    rid = (old.id if old else 0) + 1
    return RecoveryStatus(id=rid, reason=why.reason, message=why.message[:1024], started_at=now,
                          generation=generation, request=requested or None, attempts=0,
                          merge=naming.fallback_merge(rid, 0), next_attempt_at=now)


def recovery_after_attempt(recovery: RecoveryStatus, succeeded: bool, limit: int, backoff: timedelta,
                           now: datetime) -> RecoveryStatus:
    """The fallback after its current attempt finished: done, retried after a doubling delay, or
    given up after ``limit`` failed attempts."""
    if succeeded:
        return recovery.model_copy(update={"completed_at": now, "next_attempt_at": None})
    attempts = recovery.attempts + 1
    if attempts >= limit:
        return recovery.model_copy(update={"attempts": attempts, "failed_at": now, "next_attempt_at": None})
    return recovery.model_copy(update={"attempts": attempts, "merge": naming.fallback_merge(recovery.id, attempts),
                                       "next_attempt_at": now + backoff * (2 ** (attempts - 1))})


# ---- change-driven provisioning (reconcilers.children) ---------------------------------------
def desired_hash(obj: dict[str, Any]) -> str:
    """A digest of what the operator asks of a child, kept in its ``DESIRED_HASH`` annotation."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def with_desired_hash(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    annotations = {**(meta.get("annotations") or {}), naming.DESIRED_HASH: desired_hash(obj)}
    return {**obj, "metadata": {**meta, "annotations": annotations}}


def satisfies(desired: Any, observed: Any) -> bool:
    """Whether ``observed`` has every field ``desired`` sets, with the same value (fields the API
    server or others add are ignored). Lists must match item by item. An apply of what satisfies
    the observed object changes nothing, so a child that satisfies is never applied again."""
    if isinstance(desired, dict):
        # An empty list or map the API server omits (omitempty) is satisfied by its absence.
        return isinstance(observed, dict) and all(satisfies(v, observed[k]) if k in observed else v in ([], {})
                                                  for k, v in desired.items())
    if isinstance(desired, list):
        return (isinstance(observed, list) and len(desired) == len(observed)
                and all(satisfies(d, o) for d, o in zip(desired, observed, strict=True)))
    return bool(desired == observed)


def full_resync_due(learner: str, since_last: float, interval: float) -> bool:
    """Whether a learner's full resync is due: every ``interval`` seconds, stretched by up to a
    quarter by a stable per-learner jitter, so that learners created together do not resync together."""
    jitter = int.from_bytes(hashlib.sha256(f"resync\0{learner}".encode()).digest()[:4], "big") / 2**32
    return since_last >= interval * (1 + 0.25 * jitter)
