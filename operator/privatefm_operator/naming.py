"""Deterministic names and labels. Pure: the same input always gives the same name."""

from __future__ import annotations

import hashlib

GROUP = "privatefm.io"
MANAGED_BY = "privatefm-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_LEARNER = f"{GROUP}/learner"          # the LearnerNamespace's name
LABEL_LEARNER_ID = f"{GROUP}/learner-id"
LABEL_NS_UID = f"{GROUP}/ns-uid"
LABEL_TRIGGER = f"{GROUP}/trigger"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_VERSION = f"{GROUP}/version"          # the checkpoint version a verify Job checks
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
# Kueue's contract: a suspended Job with this label is Kueue's to admit (un-suspend).
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# On each child: a digest of what the operator last asked of it (reconcilers.children).
DESIRED_HASH = f"{GROUP}/desired-hash"

# Holds every LearnerNamespace until a listed guardian approved and deletionDelay has passed.
GUARDIAN_FINALIZER = f"{GROUP}/guardian"
# Set by a guardian, to their own username (an admission policy checks both).
APPROVAL_ANNOTATION = f"{GROUP}/deletion-approved-by"

# Set by anyone who may edit the LearnerNamespace, to any new value (e.g. a timestamp): each new
# value asks once for a fallback (re-clone and adapter replay), a deep check of the checkpoint, or a
# retention run now (what it prunes follows spec.retention, as a scheduled run's does).
FALLBACK_ANNOTATION = f"{GROUP}/fallback-requested"
VERIFY_ANNOTATION = f"{GROUP}/verify-requested"
PRUNE_ANNOTATION = f"{GROUP}/prune-requested"

MERGE_SERVICE_ACCOUNT = "privatefm-merge"
# A run's store credentials: a Secret owned by its Job. A scheduled run's pod template is fixed by
# the CronJob, so its Secret name is too (concurrencyPolicy Forbid: one scheduled run at a time);
# a manual run's carries its name after a '.', which no AdapterMerge (a DNS label) can contain.
SCHEDULED_RUN_SECRET = "privatefm-run-scheduled"
NETWORK_POLICY = "privatefm-isolation"
RESOURCE_QUOTA = "privatefm-quota"
LIMIT_RANGE = "privatefm-limits"
CRONJOB = "nightly-merge"


def ns_uid(learner_id: str) -> str:
    """The learner's stable id (12 hex chars), a function of its immutable ``learnerId`` alone: a
    re-created CR (after a CRD reinstall, a GitOps re-sync) finds its namespace, store prefix and
    history again, and nothing anyone can write into a status changes it."""
    return hashlib.sha256(f"privatefm-learner:{learner_id}".encode()).hexdigest()[:12]


def namespace_name(learner_id: str, uid: str) -> str:
    """``lrn-<learnerId>-<nsUid[:8]>``: readable, unique, at most 53 characters."""
    return f"lrn-{learner_id}-{uid[:8]}"


def learner_labels(lns_name: str, learner_id: str, uid: str) -> dict[str, str]:
    return {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_LEARNER: lns_name,
        LABEL_LEARNER_ID: learner_id,
        LABEL_NS_UID: uid,
    }


def run_secret(run: str) -> str:
    """The Secret holding manual run ``run``'s store credentials."""
    return f"privatefm-run.{run}"


def fallback_merge(recovery_id: int, attempt: int) -> str:
    """The AdapterMerge of a fallback's attempt: deterministic, so a restart never doubles it."""
    return f"fallback-{recovery_id}-{attempt + 1}"


def verify_job(version: int, check: int) -> str:
    """The deep-check Job of checkpoint ``version``; ``check`` counts deep checks of the learner.
    The '.' keeps it apart from every AdapterMerge's Job (an AdapterMerge's name is a DNS label)."""
    return f"verify.v{version}-{check}"


def verify_secret(job: str) -> str:
    """The Secret holding deep-check Job ``job``'s read-only store credentials (never a run's: the '.')."""
    return f"privatefm-verify.{job}"
