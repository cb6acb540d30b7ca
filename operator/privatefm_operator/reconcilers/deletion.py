"""A LearnerNamespace being deleted: held by the guardian finalizer until a listed guardian has
approved and deletionDelay has passed, then removed completely.

    reconcile = owns_anything → record → wait → delete_namespace → delete_store → audit
                → write status (once) → release

Each step is recorded in ``status.deletion`` before the next one starts, and each is idempotent,
so a restarted operator goes on where it stopped. Nothing is deleted before both the approval and
the delay; the base model is never touched (only ``learners/<nsUid>/`` is removed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from privatefm_merge.clock import rfc3339, utc_now
from privatefm_merge.errors import StorageError

from privatefm_operator import decisions, naming
from privatefm_operator.api import DeletionStatus, LearnerNamespace, LearnerNamespaceStatus
from privatefm_operator.reconcilers.base import (
    Clients,
    Invalid,
    Locks,
    RetryLater,
    Step,
    labels_of,
    parse,
    retry_on_conflict,
    status_of,
    write_status,
)
from privatefm_operator.reconcilers.learner import LearnerReconciler, claim_namespace, learner_of
from privatefm_operator.sharding import without_kopf_finalizers

log = logging.getLogger("privatefm.operator")
NAMESPACE_POLL_SECONDS = 2.0


@dataclass
class DeletionScope:
    lns: LearnerNamespace
    now: datetime
    deletion: DeletionStatus
    retry_in: float | None = None  # seconds until the next look; None once the learner is gone
    after_write: list[Callable[[], None]] = field(default_factory=list)


class DeletionReconciler:
    def __init__(self, clients: Clients, learners: LearnerReconciler) -> None:
        self.clients = clients
        self.learners = learners  # its count of managed learners includes those being deleted
        self._locks = Locks()

    def reconcile(self, lns: LearnerNamespace | Invalid) -> float | None:
        """Returns the seconds until it wants to look again, or None when the learner is gone."""
        self.learners.track(lns.metadata["name"])
        if isinstance(lns, Invalid):  # nothing to go by (no learnerId): hold it, loudly
            log.warning("LearnerNamespace %s is being deleted but does not parse: %s", lns.metadata["name"],
                        lns.error)
            return self.clients.settings.resync_seconds
        with self._locks(None, lns.name):
            return retry_on_conflict(lambda n: self._pass(lns if n == 0 else self._fetch(lns.name)))

    def _fetch(self, name: str) -> LearnerNamespace | Invalid | None:
        body = self.clients.kube.get("LearnerNamespace", name)
        return None if body is None else parse(LearnerNamespace, body)

    def _pass(self, lns: LearnerNamespace | Invalid | None) -> float | None:
        if not isinstance(lns, LearnerNamespace):
            return None if lns is None else self.clients.settings.resync_seconds
        if naming.GUARDIAN_FINALIZER not in (lns.metadata.get("finalizers") or []):
            return None  # not held by us (a break-glass removal, or created and deleted at once)
        scope = DeletionScope(lns, utc_now(), status_of(lns, LearnerNamespaceStatus).deletion or DeletionStatus())
        for phase in (self.owns_anything, self.record, self.wait, self.delete_namespace, self.delete_store,
                      self.audit):
            if phase(scope) is not Step.CONTINUE:
                break
        else:
            scope.after_write.append(lambda: self.release(scope))
        self.write(scope)
        for effect in scope.after_write:
            effect()
        return scope.retry_in

    # ---- phases ------------------------------------------------------------------------------
    def owns_anything(self, scope: DeletionScope) -> Step:
        """A CR that never owned its learner's namespace (a Stalled twin with the same learnerId, or one
        facing a foreign namespace) owns nothing: it goes at once, and touches nothing on its way."""
        if scope.deletion.started_at is not None:
            return Step.CONTINUE
        learner = learner_of(scope.lns)
        claim, _ = claim_namespace(self.clients, learner, self.clients.kube.get("Namespace", learner.namespace))
        if claim in (decisions.Claim.IN_USE, decisions.Claim.FOREIGN):
            scope.after_write.append(lambda: self.release(scope))
            return Step.DONE
        return Step.CONTINUE

    def record(self, scope: DeletionScope) -> Step:
        lns, before = scope.lns, scope.deletion
        requested = _parse_time(lns.metadata.get("deletionTimestamp")) or scope.now
        approved_by = decisions.approver(lns.metadata.get("annotations") or {}, lns.spec.guardians)
        scope.deletion = decisions.deletion_progress(
            before if before.requested_at else None, requested, approved_by,
            decisions.go_duration(lns.spec.deletion_delay), scope.now)
        after = scope.deletion
        if before.requested_at is None:
            self._event(scope, "Normal", "DeletionRequested",
                        f"deletion requested; held until a listed guardian approves and {lns.spec.deletion_delay} "
                        "pass")
        if after.approved_by and after.approved_by != before.approved_by:
            self._event(scope, "Normal", "DeletionApproved",
                        f"approved by {after.approved_by}; deletion runs at {rfc3339(after.not_before)}")
        elif before.approved_by and not after.approved_by and after.started_at is None:
            self._event(scope, "Normal", "DeletionRevoked", f"{before.approved_by}'s approval was withdrawn")
        return Step.CONTINUE

    def wait(self, scope: DeletionScope) -> Step:
        d = scope.deletion
        if decisions.deletion_due(d, scope.now):
            if d.started_at is None:  # the point of no return
                scope.deletion = d.model_copy(update={"started_at": scope.now})
            return Step.CONTINUE
        until = (d.not_before - scope.now).total_seconds() if d.not_before else float("inf")
        scope.retry_in = max(1.0, min(self.clients.settings.resync_seconds, until))
        return Step.DONE

    def delete_namespace(self, scope: DeletionScope) -> Step:
        if scope.deletion.namespace_deleted_at is not None:
            return Step.CONTINUE
        learner, kube = learner_of(scope.lns), self.clients.kube
        ns = kube.get("Namespace", learner.namespace)
        labels = labels_of(ns)
        ours = ns is not None and decisions.is_learner_namespace(learner.namespace, labels, learner.namespace,
                                                                  learner.ns_uid) \
            and labels.get(naming.LABEL_LEARNER) == scope.lns.name
        if ours:
            if not (ns or {}).get("metadata", {}).get("deletionTimestamp"):
                kube.delete("Namespace", learner.namespace)
            scope.retry_in = NAMESPACE_POLL_SECONDS  # wait until it is gone
            return Step.DONE
        scope.deletion = scope.deletion.model_copy(update={"namespace_deleted_at": scope.now})
        return Step.CONTINUE

    def delete_store(self, scope: DeletionScope) -> Step:
        if scope.deletion.store_objects_removed is not None:
            return Step.CONTINUE
        learner = learner_of(scope.lns)
        try:
            objects, size = self.clients.storage.delete_learner(learner.ns_uid, learner.spec.base_model.name)
        except StorageError as err:
            raise RetryLater(f"could not delete learners/{learner.ns_uid}/: {err}", delay=15) from err
        scope.deletion = scope.deletion.model_copy(update={"store_objects_removed": objects,
                                                           "store_bytes_removed": size})
        return Step.CONTINUE

    def audit(self, scope: DeletionScope) -> Step:
        if scope.deletion.audit_record is not None:
            return Step.CONTINUE
        d, learner = scope.deletion, learner_of(scope.lns)
        record = {
            "type": "LearnerDeleted", "learner": scope.lns.name, "learnerId": learner.spec.learner_id,
            "nsUid": learner.ns_uid, "namespace": learner.namespace,
            # Kubernetes does not record who deleted an object; the API server's audit log does.
            "requestedBy": None, "requestedAt": rfc3339(d.requested_at),
            "approvedBy": d.approved_by, "approvedAt": rfc3339(d.approved_at), "notBefore": rfc3339(d.not_before),
            "startedAt": rfc3339(d.started_at), "namespaceDeletedAt": rfc3339(d.namespace_deleted_at),
            "storeObjectsRemoved": d.store_objects_removed, "storeBytesRemoved": d.store_bytes_removed,
            "deletionDelay": learner.spec.deletion_delay, "completedAt": rfc3339(scope.now),
        }
        try:
            uri = self.clients.storage.write_audit(learner.ns_uid, f"{rfc3339(d.requested_at)}-deleted", record)
        except StorageError as err:
            raise RetryLater(f"could not write the audit record: {err}", delay=15) from err
        scope.deletion = d.model_copy(update={"audit_record": uri})
        self._event(scope, "Normal", "LearnerDeleted",
                    f"namespace {learner.namespace} and {d.store_objects_removed} objects "
                    f"({d.store_bytes_removed} bytes) under learners/{learner.ns_uid}/ deleted, approved by "
                    f"{d.approved_by}; audit record {uri}")
        return Step.CONTINUE

    # ---- the one status write, and the release -----------------------------------------------
    def write(self, scope: DeletionScope) -> None:
        old = status_of(scope.lns, LearnerNamespaceStatus)
        new = decisions.deletion_status(old, scope.deletion, scope.lns.generation, scope.now)
        body = write_status(self.clients.kube, "LearnerNamespace", scope.lns.metadata, old, new, observed=True)
        if body is not None:
            scope.lns = LearnerNamespace.model_validate(body)

    def release(self, scope: DeletionScope) -> None:
        """Removes the guardian finalizer (guarded by resourceVersion: a concurrent change is a 409)."""
        meta = scope.lns.metadata
        kept = [f for f in without_kopf_finalizers(meta.get("finalizers") or []) if f != naming.GUARDIAN_FINALIZER]
        self.clients.kube.patch("LearnerNamespace", scope.lns.name, {"metadata": {
            "finalizers": kept, "resourceVersion": meta["resourceVersion"]}})
        log.info("learner deleted", extra={"fields": {"learner": scope.lns.name,
                                                      "audit": scope.deletion.audit_record}})
        scope.retry_in = None

    def _event(self, scope: DeletionScope, type_: str, reason: str, message: str) -> None:
        scope.after_write.append(lambda: self.clients.kube.event(scope.lns.ref(), type_, reason, message))


def _parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None
