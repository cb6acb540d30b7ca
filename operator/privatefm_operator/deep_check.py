"""The deep check's verdict: what a finished verify Job says about a checkpoint. Pure, no I/O.

A verify Job (``builders.verify_job``) rehashes one checkpoint with ``privatefm-merge verify`` and
reports a ``contract.VerifyResult`` in its termination message. :func:`outcome_of` turns the Job's
status and that message into a :class:`VerifyOutcome`. Only a report of a bad file or a bad
manifest is *corruption*; a Job that died without a report, a store it could not read, or a report
about another checkpoint says nothing about the bytes (``corrupt`` False): check again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from privatefm_merge.contract import VerifyReason, VerifyResult
from privatefm_merge.layout import MANIFEST_NAME

from privatefm_operator import decisions

# What a failed deep check can say about the checkpoint itself.
CORRUPTION = frozenset({VerifyReason.CHECKSUM_MISMATCH.value, VerifyReason.SIZE_MISMATCH.value,
                        VerifyReason.FILE_MISSING.value, VerifyReason.MANIFEST_MISSING.value,
                        VerifyReason.MANIFEST_INVALID.value})
JOB_FAILED = "VerifyJobFailed"   # the Job ended without a readable report (deadline, OOM, a crash)
JOB_LOST = "VerifyJobLost"       # the Job is gone (deleted, or its TTL passed) before it was read
FOREIGN_JOB = "ForeignJob"       # a Job of that name that the operator did not make for this check


@dataclass(frozen=True)
class VerifyOutcome:
    """A finished deep check. ``reason`` and ``file`` are None when it passed."""

    passed: bool
    reason: str | None
    file: str | None
    message: str
    manifest_sha256: str | None = None  # of the manifest.json the Job checked against

    @property
    def corrupt(self) -> bool:
        """The checkpoint itself is bad (as opposed to a check that could not finish)."""
        return not self.passed and self.reason in CORRUPTION


def outcome_of(job_status: dict[str, Any], termination_message: str | None, uri: str,
               expected_manifest_sha256: str | None = None) -> VerifyOutcome | None:
    """The verdict of the verify Job of the checkpoint at ``uri``; None while it has not finished.

    ``expected_manifest_sha256`` (``status.currentCheckpoint.manifestSha256``): a manifest that was
    rewritten consistently with rewritten files still verifies against itself, so it must also
    be the manifest that was accepted. A mismatch is ``ChecksumMismatch`` of ``manifest.json``.
    """
    if not decisions.job_finished(job_status):
        return None
    result: VerifyResult | None = None
    problem = ""
    if termination_message:
        try:
            result = VerifyResult.from_json(termination_message)
        except Exception as err:  # a pod may write anything there
            problem = f"unreadable verify result: {err}"
    if result is None:
        failed: dict[str, Any] = next((c for c in job_status.get("conditions") or []
                       if c.get("type") in ("Failed", "FailureTarget") and c.get("status") == "True"), {})
        detail = problem or failed.get("message") or failed.get("reason") or "no result in its termination message"
        return VerifyOutcome(False, JOB_FAILED, None, f"the verify Job ended without a result: {detail}")
    if result.uri is not None and result.uri != uri:
        return VerifyOutcome(False, JOB_FAILED, None, f"the verify Job reported on {result.uri}, not {uri}")
    if not result.passed:
        return VerifyOutcome(False, result.reason or JOB_FAILED, result.file, result.message, result.manifest_sha256)
    if expected_manifest_sha256 and result.manifest_sha256 != expected_manifest_sha256:
        return VerifyOutcome(False, VerifyReason.CHECKSUM_MISMATCH.value, MANIFEST_NAME,
                             f"manifest.json has sha256 {result.manifest_sha256}; the accepted checkpoint's is "
                             f"{expected_manifest_sha256}", result.manifest_sha256)
    return VerifyOutcome(True, None, None, result.message, result.manifest_sha256)
