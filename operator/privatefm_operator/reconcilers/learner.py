"""LearnerNamespace: keep the learner's namespace and its children true, and report what is.

    reconcile = read_spec → hold → acknowledge (a first status) → provision → observe_base → recover_history
                → check_integrity → deep_check → heal → retain → write status → announce

Self-healing: ``check_integrity`` runs the cheap check of the current checkpoint (manifest, sizes,
checksums; no model bytes) when the learner's staggered slot comes. A failed check takes the
checkpoint out of currentCheckpoint and sets Degraded with the reason and the file. ``heal`` starts
a fallback for a failed check, a lag beyond maxVersionLag (unless the base is pinned) or a
``fallback-requested`` annotation: a Fallback AdapterMerge folds the adapter log onto the target
base (or re-clones it), retried with a doubling delay up to fallbackRetryLimit, then Stalled.
``retain`` prunes old checkpoints when the cleanup schedule fires (``reconcilers.retention``).

A spec the API server refuses (say, an unknown time zone for the CronJob) ends the reconcile as
Stalled/InvalidSpec with the server's message and a Warning Event, and is not tried again until
the spec changes. An unreachable store is reported (StoreAvailable=False), not retried silently.

The learner's status is written only by ``update_status`` below: by this reconcile, and by the
merge reconciler handing out a version or advancing the checkpoint (both read-modify-write with
optimistic concurrency, because concurrent merges of one learner race for them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from kubernetes.client.exceptions import ApiException
from privatefm_merge import layout
from privatefm_merge.clock import rfc3339, utc_now
from privatefm_merge.errors import StorageError

from privatefm_operator import builders, decisions, metrics, naming
from privatefm_operator.api import (
    Checkpoint,
    IntegrityStatus,
    LearnerNamespace,
    LearnerNamespaceStatus,
    MergePhase,
    MergeTrigger,
    RecoveryStatus,
)
from privatefm_operator.builders import Learner
from privatefm_operator.kube import FIELD_MANAGER, api_message
from privatefm_operator.reconcilers.base import (
    Clients,
    Invalid,
    Locks,
    RetryLater,
    Step,
    distrust,
    labels_of,
    parse,
    retry_on_conflict,
    status_of,
    write_status,
)
from privatefm_operator.reconcilers.children import Children
from privatefm_operator.reconcilers.verify import VerifyChecks, VerifyConflict
from privatefm_operator.sharding import without_kopf_finalizers
from privatefm_operator.storage import CredentialsDenied

if TYPE_CHECKING:
    from privatefm_operator.reconcilers.merge import MergeReconciler
    from privatefm_operator.reconcilers.retention import Retention

log = logging.getLogger("privatefm.operator")


def learner_of(lns: LearnerNamespace) -> Learner:
    """What the builders need. Identity derives from the immutable learnerId alone, never from a
    status field someone else might have written."""
    uid = naming.ns_uid(lns.spec.learner_id)
    return Learner(name=lns.name, ns_uid=uid, namespace=naming.namespace_name(lns.spec.learner_id, uid),
                   spec=lns.spec)


def claim_namespace(clients: Clients, learner: Learner, namespace: dict[str, Any] | None
                    ) -> tuple[decisions.Claim, str | None]:
    """What this learner may do with the (existing, or None) namespace its identity maps to, and
    the LearnerNamespace that namespace is recorded for."""
    labels = labels_of(namespace) if namespace is not None else None
    owner = (labels or {}).get(naming.LABEL_LEARNER)
    other = clients.kube.get("LearnerNamespace", owner) if owner and owner != learner.name else None
    alive = other is not None and not other["metadata"].get("deletionTimestamp")
    return decisions.namespace_claim(labels, learner.name, alive), owner


@dataclass
class LearnerScope:
    """One reconcile's working state: what each phase learned."""

    lns: LearnerNamespace | Invalid
    learner: Learner | None = None
    spec_problem: str = ""
    claim_problem: decisions.Failure | None = None
    created: bool = False
    latest_base: int | None = None
    base_problem: str = ""
    store_problem: str = ""
    history: decisions.History | None = None
    full: bool = False  # the periodic full resync: apply every child, whatever the watches said
    mutations: list[Callable[[LearnerNamespaceStatus], LearnerNamespaceStatus]] = field(default_factory=list)
    announcements: list[Callable[[], None]] = field(default_factory=list)


def update_status(clients: Clients, lns: LearnerNamespace | Invalid,
                  mutate: Callable[[LearnerNamespaceStatus], LearnerNamespaceStatus], *,
                  observed: bool = False) -> LearnerNamespace | Invalid:
    """Read-modify-write of one learner's status; no write when nothing changes."""
    def attempt(n: int) -> LearnerNamespace | Invalid:
        # After a conflict the object must be read again: someone else wrote its status.
        current = lns if n == 0 else _fetch(clients, lns.metadata["name"])
        old = status_of(current, LearnerNamespaceStatus)
        body = write_status(clients.kube, "LearnerNamespace", current.metadata, old, mutate(old), observed=observed)
        return current if body is None else parse(LearnerNamespace, body)
    return retry_on_conflict(attempt)


def _fetch(clients: Clients, name: str) -> LearnerNamespace | Invalid:
    body = clients.kube.get("LearnerNamespace", name)
    if body is None:
        raise RetryLater(f"LearnerNamespace {name} disappeared")
    return parse(LearnerNamespace, body)


class LearnerReconciler:
    def __init__(self, clients: Clients) -> None:
        self.clients = clients
        self.merges: MergeReconciler | None = None  # set once both exist (they refer to each other)
        self.verify: VerifyChecks | None = None
        self.retention: Retention | None = None  # set by build()
        self.children = Children()
        self._locks = Locks()
        self._known: set[str] = set()
        self._warned: set[str] = set()
        self._last_full: dict[str, float] = {}  # learner: when its last full resync ran (monotonic)
        self._provisioned: dict[str, int] = {}  # learner: the generation whose children this process applied

    # ---- entry points ------------------------------------------------------------------------
    def reconcile(self, lns: LearnerNamespace | Invalid) -> None:
        """A pass on a spec change, at start-up, or when a child drifted (change-driven)."""
        self.reconcile_only(lns)

    def resync(self, lns: LearnerNamespace | Invalid) -> None:
        """The timer's pass: cheap unless this learner's full resync is due (a jittered, long
        interval), which applies every child and looks again at all the learner's open runs (a
        safety net for missed watch events). Runs this process knows to be open are looked at on
        every pass."""
        name, now = lns.metadata["name"], time.monotonic()
        last = self._last_full.setdefault(name, now)  # the first pass after start-up was a full one
        full = decisions.full_resync_due(name, now - last, self.clients.settings.full_resync_seconds)
        learner = self.reconcile_only(lns, full=full)
        if full:
            self._last_full[name] = now
        # Open runs are looked at again on every pass: a pending one turns Stalled by the clock,
        # which no watch event announces. A learner with none costs nothing here.
        if learner is not None and self.merges is not None and (full or self.merges.has_open_runs(learner.namespace)):
            self.merges.sweep(learner.namespace)

    def reconcile_only(self, lns: LearnerNamespace | Invalid, full: bool = False) -> Learner | None:
        name = lns.metadata["name"]
        self.track(name)
        if lns.metadata.get("deletionTimestamp"):
            return None
        with self._locks(None, name):
            scope = LearnerScope(lns, full=full)
            for phase in (self.read_spec, self.hold, self.acknowledge, self.provision, self.observe_base,
                          self.recover_history, self.check_integrity, self.deep_check, self.heal, self.retain):
                step = phase(scope)
                if step is Step.SKIP:
                    return scope.learner
                if step is not Step.CONTINUE:
                    break
            self.write(scope)
            for announce in scope.announcements:
                announce()
            return scope.learner

    def refresh(self, name: str) -> None:
        """Re-derive a learner's status after its checkpoint moved (lag, conditions), without the sweep."""
        body = self.clients.kube.get("LearnerNamespace", name)
        if body is not None:
            self.reconcile_only(parse(LearnerNamespace, body))

    def track(self, name: str) -> None:
        """A LearnerNamespace this operator manages (until its deletion completes)."""
        if name not in self._known:
            self._known.add(name)
            metrics.LEARNER_NAMESPACES.set(len(self._known))

    def forget(self, name: str) -> None:
        self._known.discard(name)
        self._last_full.pop(name, None)
        self._provisioned.pop(name, None)
        self.children.forget(name)
        metrics.LEARNER_NAMESPACES.set(len(self._known))
        metrics.forget_learner(name)

    # ---- phases ------------------------------------------------------------------------------
    def read_spec(self, scope: LearnerScope) -> Step:
        if isinstance(scope.lns, Invalid):  # the CRD schema should have caught it; say so, do nothing
            return self._invalid(scope, scope.lns.error)
        scope.learner = learner_of(scope.lns)
        status = status_of(scope.lns, LearnerNamespaceStatus)
        if decisions.skip_invalid_spec(status, scope.lns.generation):
            return Step.SKIP
        if status.ns_uid and status.ns_uid != scope.learner.ns_uid and scope.lns.name not in self._warned:
            self._warned.add(scope.lns.name)  # once per learner: it cannot change (status.nsUid is immutable)
            distrust(self.clients.kube, scope.lns.ref(), "NsUidMismatch",
                     f"status.nsUid {status.ns_uid!r} is not the learner's ({scope.learner.ns_uid}); "
                     "the operator ignores it")
        return Step.CONTINUE

    def hold(self, scope: LearnerScope) -> Step:
        """Every learner carries the guardian finalizer: a delete only marks it for a guardian's approval.
        It is the only finalizer the operator keeps: kopf's, from earlier versions, are dropped."""
        assert isinstance(scope.lns, LearnerNamespace)
        finalizers = scope.lns.metadata.get("finalizers") or []
        wanted = without_kopf_finalizers(finalizers)
        if naming.GUARDIAN_FINALIZER not in wanted:
            wanted.append(naming.GUARDIAN_FINALIZER)
        if wanted != finalizers:
            body = self.clients.kube.patch("LearnerNamespace", scope.lns.name, {"metadata": {
                "finalizers": wanted, "resourceVersion": scope.lns.metadata["resourceVersion"]}})
            scope.lns = parse(LearnerNamespace, body)
        return Step.CONTINUE

    def acknowledge(self, scope: LearnerScope) -> Step:
        """A generation seen for the first time gets a status at once (Reconciling=True,
        observedGeneration), before the slow steps: GitOps tools read it as progressing."""
        generation, now = scope.lns.metadata.get("generation"), utc_now()
        if decisions.first_status(status_of(scope.lns, LearnerNamespaceStatus), generation, now) is not None:
            scope.lns = update_status(self.clients, scope.lns,
                                      lambda old: decisions.first_status(old, generation, now) or old)
        return Step.CONTINUE

    def _invalid(self, scope: LearnerScope, problem: str) -> Step:
        scope.spec_problem = problem
        scope.announcements.append(lambda: self.clients.kube.event(
            scope.lns.ref(), "Warning", "InvalidSpec", problem))
        return Step.DONE

    def provision(self, scope: LearnerScope) -> Step:
        """Applies the Namespace and its children (server-side apply: creates, repairs drift, or no-op).
        Nothing to do, not even building the requests, when this process applied this generation's
        children and every one of them is, as the watches last saw it, what was asked: a child that
        drifts or vanishes makes the watch unsettle it and start a pass, and a full resync looks anyway."""
        learner, kube = scope.learner, self.clients.kube
        assert learner is not None
        generation = scope.lns.metadata.get("generation")
        if not scope.full and self._provisioned.get(learner.name) == generation and self.children.settled(learner.name):
            return Step.CONTINUE
        existing = None if scope.full else self.children.namespace(learner.namespace)
        if existing is None and (scope.full or not self.children.namespace_absent(learner.namespace)):
            existing = kube.get("Namespace", learner.namespace)
        if existing and existing.get("status", {}).get("phase") == "Terminating":
            raise RetryLater(f"namespace {learner.namespace} is terminating", delay=10)
        claim, owner = claim_namespace(self.clients, learner, existing)
        scope.claim_problem = decisions.claim_failure(claim, learner.namespace, owner)
        if scope.claim_problem is not None:
            return Step.DONE
        if claim == decisions.Claim.ADOPT:
            scope.announcements.append(lambda: self.clients.kube.event(
                scope.lns.ref(), "Normal", "NamespaceAdopted",
                f"adopted namespace {learner.namespace} (recorded for {owner}, which no longer exists)"))
        for child in [builders.namespace(learner), *builders.children(learner, self.clients.settings)]:
            child = decisions.with_desired_hash(child)
            reason = "full" if scope.full else self.children.needs_apply(child)
            if reason is None:
                continue
            try:
                result = kube.apply(child)
            except ApiException as err:
                if child["kind"] == "Namespace" and claim == decisions.Claim.CREATE and err.status == 403:
                    return self._taken(scope, learner, err)  # the confinement policy, if it exists and is not ours
                if err.status not in (400, 422):  # the API server refused what the spec asks for
                    raise
                return self._invalid(scope, f"{child['kind']} {child['metadata']['name']}: {api_message(err)}")
            if child["kind"] == "Namespace" and claim == decisions.Claim.CREATE and not decisions.made_by(
                    result, FIELD_MANAGER):
                kube.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": learner.namespace}})
                return self._taken(scope, learner)  # created by someone else since the name was seen free
            self.children.applied(learner.name, child, result)
            metrics.CHILD_APPLIES.labels(child["kind"], reason).inc()
        if existing is None:
            scope.created = True
            scope.announcements.append(lambda: self._announce_created(scope))
        if isinstance(generation, int):
            self._provisioned[learner.name] = generation
        return Step.CONTINUE

    def _taken(self, scope: LearnerScope, learner: Learner, refused: ApiException | None = None) -> Step:
        """The namespace the learner's identity maps to turned out to exist when the operator, from
        what its watch had shown, applied it as new: someone created it in between. Nothing of it is
        kept (what the apply added was taken back, or the confinement policy refused it); the claim
        is made again from a fresh read. A refusal (``refused``) of a namespace that still does not
        exist is not this race: it is raised as it came."""
        existing = self.clients.kube.get("Namespace", learner.namespace)
        if existing is not None:
            log.warning("namespace %s appeared before the operator created it; claiming it again from a read",
                        learner.namespace, extra={"fields": {"learner": learner.name}})
        claim, owner = claim_namespace(self.clients, learner, existing)
        scope.claim_problem = decisions.claim_failure(claim, learner.namespace, owner)
        if scope.claim_problem is not None:
            return Step.DONE
        if refused is not None and claim == decisions.Claim.CREATE:
            raise refused
        raise RetryLater(f"namespace {learner.namespace} changed while it was being claimed", delay=1)

    def recover_history(self, scope: LearnerScope) -> Step:
        """A status that has never seen a version: is there a history in the store to take up?"""
        status = status_of(scope.lns, LearnerNamespaceStatus)
        if scope.store_problem or status.last_assigned_version is not None:
            return Step.CONTINUE
        assert scope.learner is not None
        try:
            highest, merges = self.clients.storage.learner_history(scope.learner.ns_uid)
        except StorageError as err:
            scope.store_problem = str(err)
            return Step.CONTINUE
        scope.history = decisions.History(highest, tuple(merges))
        return Step.CONTINUE

    def observe_base(self, scope: LearnerScope) -> Step:
        learner, storage = scope.learner, self.clients.storage
        assert learner is not None
        model = learner.spec.base_model
        try:
            scope.latest_base = storage.latest_base_version(model.name)
            pinned_found = model.version is not None and storage.base_exists(model.name, model.version)
        except StorageError as err:
            scope.store_problem = str(err)
            return Step.CONTINUE
        scope.base_problem = decisions.base_problem(model.name, model.version, pinned_found, scope.latest_base)
        return Step.CONTINUE

    # ---- the one status write, and what follows it -------------------------------------------
    def write(self, scope: LearnerScope) -> None:
        learner = scope.learner
        facts = decisions.LearnerFacts(
            generation=scope.lns.metadata.get("generation"), now=utc_now(), spec_problem=scope.spec_problem,
            claim_problem=scope.claim_problem, checkpoints_uri=self.checkpoints_uri(learner) if learner else None,
            history=scope.history,
            ns_uid=learner.ns_uid if learner else None, namespace=learner.namespace if learner else None,
            merge_schedule=builders.merge_schedule(learner, self.clients.settings) if learner else None,
            latest_base=scope.latest_base, base_problem=scope.base_problem, store_problem=scope.store_problem,
            store_grace=timedelta(seconds=self.clients.settings.store_grace_seconds),
            max_lag=self.clients.settings.max_version_lag, scoped_store=self.clients.storage.scoped)
        def mutate(old: LearnerNamespaceStatus) -> LearnerNamespaceStatus:
            for change in scope.mutations:
                old = change(old)
            return decisions.learner_status(facts, old)
        written = status_of(update_status(self.clients, scope.lns, mutate, observed=True), LearnerNamespaceStatus)
        current = written.current_checkpoint
        metrics.observe_learner(scope.lns.metadata["name"], current.version if current else None,
                                current.verified_at.timestamp() if current and current.verified_at else None,
                                written.version_lag)

    # ---- self-healing ------------------------------------------------------------------------
    def check_integrity(self, scope: LearnerScope) -> Step:
        """The cheap check of the current checkpoint, in this learner's slot of the interval."""
        learner, now, settings = scope.learner, utc_now(), self.clients.settings
        assert learner is not None
        status = status_of(scope.lns, LearnerNamespaceStatus)
        current, integrity = status.current_checkpoint, status.integrity
        if scope.store_problem or current is None or (integrity and integrity.failed_version == current.version):
            return Step.CONTINUE
        last = integrity.checked_at if integrity and integrity.checked_version == current.version else None
        interval = timedelta(seconds=settings.integrity_check_seconds)
        if not decisions.check_due(learner.ns_uid, last or current.verified_at, interval, now):
            return Step.CONTINUE
        try:
            findings = self.clients.storage.check_checkpoint(learner.ns_uid, current.version,
                                                             current.manifest_sha256)
        except StorageError as err:
            scope.store_problem = str(err)
            return Step.CONTINUE
        self.record_check(scope, current.version, findings, now, deep=False)
        return Step.CONTINUE

    def deep_check(self, scope: LearnerScope) -> Step:
        """Starts the verify Job when the learner's weekly slot comes or one is requested, and takes
        its verdict once it has finished."""
        learner, lns, now, settings = scope.learner, scope.lns, utc_now(), self.clients.settings
        assert learner is not None and isinstance(lns, LearnerNamespace) and self.verify is not None
        status = status_of(lns, LearnerNamespaceStatus)
        integrity, current = status.integrity or IntegrityStatus(), status.current_checkpoint
        if scope.store_problem:
            return Step.CONTINUE
        if integrity.verify_job and integrity.verify_version is not None:
            return self._take_verdict(scope, learner, integrity, now)
        requested = (lns.metadata.get("annotations") or {}).get(naming.VERIFY_ANNOTATION)
        asked = bool(requested) and requested != integrity.verify_request
        if current is None or integrity.failed_version == current.version:
            return Step.CONTINUE
        last = integrity.deep_checked_at if integrity.deep_checked_version == current.version else None
        due = decisions.check_due(learner.ns_uid, last or current.verified_at,
                                  timedelta(seconds=settings.deep_check_seconds), now)
        if not (asked or due):
            return Step.CONTINUE
        name = naming.verify_job(current.version, integrity.deep_checks + 1)
        try:
            self.verify.start(learner, current.version, current.uri, name)
        except (CredentialsDenied, VerifyConflict) as err:
            problem = str(err)
            scope.announcements.append(lambda: self._event(scope, "Warning", "DeepCheckNotStarted", problem))
            return Step.CONTINUE
        version = current.version
        scope.mutations.append(lambda st: st.model_copy(update={"integrity": (st.integrity or IntegrityStatus())
                                                                .model_copy(update={
            "verify_job": name, "verify_version": version, "verify_request": requested or None,
            "deep_checks": integrity.deep_checks + 1})}))
        return Step.CONTINUE

    def _take_verdict(self, scope: LearnerScope, learner: Learner, integrity: IntegrityStatus,
                      now: datetime) -> Step:
        assert self.verify is not None and integrity.verify_job and integrity.verify_version is not None
        name, version = integrity.verify_job, integrity.verify_version
        status = status_of(scope.lns, LearnerNamespaceStatus)
        current = status.current_checkpoint
        expected = current.manifest_sha256 if current is not None and current.version == version else None
        outcome = self.verify.outcome(learner.namespace, name, expected)
        if outcome is None:
            return Step.CONTINUE
        def done(st: LearnerNamespaceStatus) -> LearnerNamespaceStatus:
            return st.model_copy(update={"integrity": (st.integrity or IntegrityStatus()).model_copy(update={
                "verify_job": None, "verify_version": None})})
        scope.mutations.append(done)
        if outcome.passed or outcome.corrupt:
            reason = decisions.Corruption.MANIFEST_MISSING if outcome.reason == "ManifestInvalid" else \
                decisions.Corruption(outcome.reason) if outcome.reason else None
            findings = [] if reason is None else [decisions.Finding(reason, outcome.file or "", outcome.message)]
            self.record_check(scope, version, findings, now, deep=True)
        else:  # the check could not finish: it says nothing about the bytes; the next slot tries again
            scope.announcements.append(lambda: self._event(
                scope, "Warning", "DeepCheckFailed", f"{name}: {outcome.reason}: {outcome.message}"))
        verify = self.verify

        def clean_up() -> None:
            verify.delete(learner.namespace, name)
        scope.announcements.append(clean_up)
        return Step.CONTINUE

    def record_check(self, scope: LearnerScope, version: int, findings: list[decisions.Finding], now: datetime,
                     deep: bool) -> None:
        scope.mutations.append(lambda st: decisions.integrity_checked(st, version, findings, now, deep=deep))
        if findings:
            first, check = findings[0], "deep" if deep else "cheap"
            def announce() -> None:
                metrics.CORRUPTION_DETECTED.labels(reason=first.reason.value, check=check).inc()
                self.clients.kube.event(scope.lns.ref(), "Warning", "CorruptionDetected",
                                        f"checkpoint v{version} failed the {check} check: {first.reason.value} "
                                        f"({first.file}): {first.message}"[:1024])
            scope.announcements.append(announce)

    def heal(self, scope: LearnerScope) -> Step:
        """Starts a fallback when one is due, and moves the one under way along."""
        lns, learner, settings, now = scope.lns, scope.learner, self.clients.settings, utc_now()
        assert isinstance(lns, LearnerNamespace) and learner is not None
        if scope.store_problem or scope.base_problem:
            return Step.CONTINUE
        view = status_of(lns, LearnerNamespaceStatus)
        for change in scope.mutations:  # what this pass has found so far
            view = change(view)
        recovery = view.recovery
        if not decisions.recovery_active(recovery):
            requested = (lns.metadata.get("annotations") or {}).get(naming.FALLBACK_ANNOTATION)
            why = decisions.fallback_reason(view, learner.spec.base_model.version is not None,
                                            settings.max_version_lag, requested)
            started = decisions.start_recovery(recovery, why, lns.generation, requested, now)
            if started is None:
                return Step.CONTINUE
            self._set_recovery(scope, recovery, started, lambda: self._event(
                scope, "Normal", "FallbackInitiated",
                f"fallback {started.id} ({started.reason}): {started.message}; merge {started.merge}"))
            recovery = started
        assert recovery is not None
        self._attempt(scope, learner, recovery, now)
        return Step.CONTINUE

    def _attempt(self, scope: LearnerScope, learner: Learner, recovery: RecoveryStatus, now: datetime) -> None:
        """Creates the attempt's Fallback AdapterMerge when its time has come, or takes its outcome."""
        settings, kube = self.clients.settings, self.clients.kube
        assert recovery.merge is not None
        body = kube.get("AdapterMerge", recovery.merge, learner.namespace)
        if body is None:
            if recovery.next_attempt_at is None or now >= recovery.next_attempt_at:
                self._create_fallback_merge(scope, learner, recovery)
            return
        phase = (body.get("status") or {}).get("phase")
        if phase not in (MergePhase.SUCCEEDED.value, MergePhase.FAILED.value):
            return
        succeeded = phase == MergePhase.SUCCEEDED.value
        after = decisions.recovery_after_attempt(recovery, succeeded, settings.fallback_retry_limit,
                                                 timedelta(seconds=settings.fallback_backoff_seconds), now)
        message = (body.get("status") or {}).get("message") or ""
        if succeeded:
            def announce() -> None:
                metrics.FALLBACK_OPERATIONS.labels(reason=recovery.reason, result="succeeded").inc()
                self._event(scope, "Normal", "FallbackCompleted",
                            f"fallback {recovery.id} ({recovery.reason}) completed by {recovery.merge}: {message}")
        elif after.failed_at is not None:
            def announce() -> None:
                metrics.FALLBACK_OPERATIONS.labels(reason=recovery.reason, result="failed").inc()
                self._event(scope, "Warning", "FallbackFailed",
                            f"fallback {recovery.id} ({recovery.reason}) gave up after {after.attempts} failed "
                            f"merges; last: {recovery.merge}: {message}")
        else:
            def announce() -> None:
                self._event(scope, "Warning", "FallbackRetrying",
                            f"fallback {recovery.id}: {recovery.merge} failed ({message}); {after.merge} "
                            f"not before {rfc3339(after.next_attempt_at)}")
        self._set_recovery(scope, recovery, after, announce)

    def _create_fallback_merge(self, scope: LearnerScope, learner: Learner, recovery: RecoveryStatus) -> None:
        model = learner.spec.base_model
        target = model.version if model.version is not None else scope.latest_base
        assert recovery.merge is not None
        body = {"apiVersion": "privatefm.io/v1alpha1", "kind": "AdapterMerge",
                "metadata": {"name": recovery.merge, "namespace": learner.namespace,
                             "labels": {naming.LABEL_MANAGED_BY: naming.MANAGED_BY,
                                        naming.LABEL_TRIGGER: MergeTrigger.FALLBACK.value}},
                "spec": {"trigger": MergeTrigger.FALLBACK.value, "baseVersion": target,
                         "reason": f"fallback {recovery.id}: {recovery.reason}"}}
        try:
            self.clients.kube.create(body)
        except ApiException as err:
            if err.status != 409:  # made by an earlier pass: its outcome is read on the next
                raise

    def _set_recovery(self, scope: LearnerScope, expected: RecoveryStatus | None, new: RecoveryStatus,
                      announce: Callable[[], None]) -> None:
        """Records the fallback's next state, and announces it only when this pass moved it (another
        pass over a stale copy finds the recovery already moved on)."""
        moved: list[bool] = [False]

        def change(st: LearnerNamespaceStatus) -> LearnerNamespaceStatus:
            moved[0] = st.recovery == expected
            return st.model_copy(update={"recovery": new}) if moved[0] else st
        scope.mutations.append(change)
        scope.announcements.append(lambda: announce() if moved[0] else None)

    def _event(self, scope: LearnerScope, kind: str, reason: str, message: str) -> None:
        self.clients.kube.event(scope.lns.ref(), kind, reason, message[:1024])
        log.info(reason, extra={"fields": {"learner": scope.lns.metadata["name"], "message": message}})

    def _announce_created(self, scope: LearnerScope) -> None:
        assert isinstance(scope.lns, LearnerNamespace) and scope.learner is not None
        namespace = scope.learner.namespace
        self.clients.kube.event(scope.lns.ref(), "Normal", "NamespaceCreated", f"created namespace {namespace}")
        log.info("namespace created", extra={"fields": {"learner": scope.lns.name, "namespace": namespace}})

    # ---- used by the merge reconciler --------------------------------------------------------
    def allocate_version(self, lns: LearnerNamespace, merge_uid: str) -> int:
        """The version of the run ``merge_uid``: the next one for this learner, never handed out twice
        (optimistic concurrency), or the one it was already handed."""
        written = status_of(update_status(self.clients, lns, lambda status: decisions.allocate_version(
            status, merge_uid)), LearnerNamespaceStatus)
        version = decisions.assigned_version(written, merge_uid)
        assert version is not None
        return version

    def advance(self, lns: LearnerNamespace, checkpoint: Checkpoint) -> None:
        """Moves currentCheckpoint forward (never back)."""
        uri = self.checkpoints_uri(learner_of(lns))
        update_status(self.clients, lns, lambda status: decisions.advance_checkpoint(status, checkpoint, uri))

    def checkpoints_uri(self, learner: Learner) -> str:
        """Where this learner's checkpoints live: the only place its currentCheckpoint may point."""
        return self.clients.storage.uri(f"{layout.learner_prefix(learner.ns_uid)}/checkpoints")

    # ---- retention (last phase) --------------------------------------------------------------
    def retain(self, scope: LearnerScope) -> Step:
        """Prunes old checkpoints when the cleanup schedule has fired (``reconcilers.retention``):
        only for a learner with a current checkpoint (as this pass found it), a reachable store and
        no deletion under way."""
        lns = scope.lns
        if self.retention is None or not isinstance(lns, LearnerNamespace) or scope.store_problem:
            return Step.CONTINUE
        view = status_of(lns, LearnerNamespaceStatus)
        for change in scope.mutations:  # what this pass has found so far (a failed check, a fallback)
            view = change(view)
        if view.current_checkpoint is None or view.deletion is not None:
            return Step.CONTINUE
        retained = self.retention.run(lns, view, utc_now()).retention
        if retained != view.retention:
            scope.mutations.append(lambda st: st.model_copy(update={"retention": retained}))
        return Step.CONTINUE
