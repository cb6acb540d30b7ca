"""Checkpoint retention for one learner: when the cleanup schedule has fired since the last run, or
a run is asked for (a new value of the ``prune-requested`` annotation), prune what
``retention.prune_plan`` says and abort stale unfinished uploads.

What is kept: the current checkpoint, the newest ``spec.retention.keep`` verified versions besides
it, and every version something still uses: the target and parent of each AdapterMerge that has
not finished, and what a verify Job is reading. A version is verified when its manifest is in the
store and the operator recorded it (its merge record in the learner's event log, or a Succeeded
AdapterMerge whose record is not written yet), and it has not failed an integrity check since.
Everything else under ``checkpoints/`` goes,
including what failed runs left.

The store is listed before the AdapterMerges are: a run that wrote into a version the listing saw
had its version recorded on its AdapterMerge before its Job existed, so it is seen as protected
(still running) or as finished.
"""

from __future__ import annotations

import logging
from datetime import datetime

from privatefm_merge.errors import StorageError

from privatefm_operator import metrics, naming, retention
from privatefm_operator.api import (
    AdapterMerge,
    AdapterMergeStatus,
    LearnerNamespace,
    LearnerNamespaceStatus,
    MergePhase,
    RetentionStatus,
)
from privatefm_operator.api import Retention as RetentionSpec
from privatefm_operator.reconcilers.base import Clients, parse, status_of
from privatefm_operator.reconcilers.learner import learner_of

log = logging.getLogger("privatefm.operator")
MAX_UPLOAD_VERSIONS = 200  # versions whose directories are searched by exact key for stale uploads (MinIO)


def _created(lns: LearnerNamespace) -> datetime | None:
    stamp = lns.metadata.get("creationTimestamp")
    if isinstance(stamp, datetime):
        return stamp
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")) if stamp else None


def _request(lns: LearnerNamespace) -> str | None:
    return (lns.metadata.get("annotations") or {}).get(naming.PRUNE_ANNOTATION)


class Retention:
    def __init__(self, clients: Clients) -> None:
        self.clients = clients
        self.cron = retention.parse_cron(clients.settings.cleanup_cron)  # a bad schedule stops the start-up

    def due(self, lns: LearnerNamespace, status: LearnerNamespaceStatus, now: datetime) -> bool:
        """The schedule fired since the last run, or a run was asked for (the prune-requested annotation)."""
        last = status.retention.last_run_at if status.retention else None
        return retention.requested(_request(lns), status.retention.request if status.retention else None) \
            or retention.due(self.cron, last, now, _created(lns))

    def run(self, lns: LearnerNamespace, status: LearnerNamespaceStatus, now: datetime) -> LearnerNamespaceStatus:
        """``status`` with ``retention`` updated when a run was due and done; unchanged otherwise (not
        due, or the store failed: the next pass tries again)."""
        if not self.due(lns, status, now):
            return status
        try:
            outcome = self._prune(lns, status, now)
        except StorageError as err:
            log.warning("retention of %s deferred, the store failed: %s", lns.name, err)
            return status
        return status.model_copy(update={"retention": outcome})

    def _prune(self, lns: LearnerNamespace, status: LearnerNamespaceStatus, now: datetime) -> RetentionStatus:
        learner, storage, settings = learner_of(lns), self.clients.storage, self.clients.settings
        dirs = storage.checkpoint_dirs(learner.ns_uid)  # before the AdapterMerges (see the module doc)
        _, records = storage.learner_history(learner.ns_uid)
        protected, succeeded = self._in_use(learner.namespace, status)
        recorded = {r.get("version") for r in records if r.get("type") == "MergeCompleted"} | succeeded
        if status.integrity is not None and status.integrity.failed_version is not None:
            recorded.discard(status.integrity.failed_version)  # it failed a check since: no longer verified
        stored = [retention.StoredVersion(d.version, d.committed and d.version in recorded, d.size_bytes, d.objects)
                  for d in dirs]
        current = status.current_checkpoint.version if status.current_checkpoint else None
        keep = (lns.spec.retention or RetentionSpec()).keep
        plan = retention.prune_plan(stored, current, keep, protected)
        names = storage.checkpoint_upload_names(learner.spec.base_model.name)
        objects = size = 0
        for version in plan:
            removed, removed_bytes = storage.delete_checkpoint(learner.ns_uid, version, names)
            objects, size = objects + removed, size + removed_bytes
        last = max([status.last_assigned_version or 0, *(d.version for d in dirs)])
        searched = [v for v in range(max(1, last - MAX_UPLOAD_VERSIONS + 1), last + 1) if v not in plan]
        aborted = storage.abort_stale_uploads(learner.ns_uid, searched, names, settings.stale_upload_seconds, now,
                                              spare=protected)
        metrics.CHECKPOINTS_PRUNED.inc(len(plan))
        metrics.CHECKPOINT_BYTES_PRUNED.inc(size)
        metrics.UPLOADS_ABORTED.inc(aborted)
        fields = {"learner": lns.name, "pruned": plan, "objects": objects, "bytes": size, "uploadsAborted": aborted,
                  "kept": sorted({d.version for d in dirs} - set(plan)), "protected": sorted(protected)}
        log.info("retention ran", extra={"fields": fields})
        if plan or aborted:
            listed = ", ".join(f"v{v}" for v in plan) or "none"
            self.clients.kube.event(lns.ref(), "Normal", "CheckpointsPruned",
                                    f"pruned {len(plan)} checkpoint versions ({listed}): {objects} objects, "
                                    f"{size} bytes; aborted {aborted} stale unfinished uploads; keep {keep} "
                                    f"besides current v{current}")
        handled = _request(lns) or (status.retention.request if status.retention else None)
        return RetentionStatus(last_run_at=now, versions_pruned=len(plan), bytes_pruned=size, request=handled)

    def _in_use(self, namespace: str, status: LearnerNamespaceStatus) -> tuple[set[int], set[int]]:
        """(versions an unfinished run writes or reads or a verify Job reads, versions of Succeeded runs)."""
        protected: set[int] = set()
        succeeded: set[int] = set()
        for body in self.clients.kube.list("AdapterMerge", namespace):
            merge = status_of(parse(AdapterMerge, body), AdapterMergeStatus)
            versions = {v for v in (merge.target_version, merge.parent_version) if v is not None}
            if merge.phase == MergePhase.SUCCEEDED:
                succeeded |= {merge.checkpoint.version} if merge.checkpoint else set()
            elif merge.phase != MergePhase.FAILED:  # not started, planned, pending, running, or unparsable
                protected |= versions
        integrity = status.integrity
        if integrity is not None and integrity.verify_job and integrity.verify_version is not None:
            protected.add(integrity.verify_version)  # the version the running verify Job reads
        return protected, succeeded
