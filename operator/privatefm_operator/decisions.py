"""Pure decisions, evaluated over plain inputs and table-tested without a cluster."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from privatefm_merge.contract import MergeResult

from privatefm_operator.api import MergePhase


def next_version(last_assigned: int | None, current: int | None) -> int:
    """Versions only ever increase, even past runs that failed or were lost."""
    return max(last_assigned or 0, current or 0) + 1


def version_lag(latest_base: int | None, checkpoint_base: int | None) -> int | None:
    if latest_base is None or checkpoint_base is None:
        return None
    return max(latest_base - checkpoint_base, 0)


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
        return JobOutcome(MergePhase.RUNNING, "Running", "the merge pod is running")
    return JobOutcome(MergePhase.PENDING, "Pending", "waiting for the merge pod")


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
