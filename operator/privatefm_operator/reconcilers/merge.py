"""AdapterMerge: one merge run, from plan to a verified checkpoint.

    reconcile = find_learner → plan → reclone → ensure_job → observe_job → accept → write status (once)

``ensure_job`` starts a run's Job only through the merge queue when a cluster-wide limit is set
(``reconcilers.queue``): a run beyond it stays Pending with reason Queued and its position, and is
passed again when a run ends.

A run folds the learner's adapter log (``privatefm_merge.adapter_log.fold``: the newest cumulative
adapter, then every incremental one after it) onto one base version. A Fallback run is the
operator's own (a learner healing itself); one whose learner has no adapter yet is a re-clone:
server-side copies of the base into the new version, and no Job.

``plan`` ends its pass early (REQUEUE): the version it assigned is written to the AdapterMerge
before any Job exists, so a restarted operator reuses it instead of assigning another. Events and
metrics of a finished run follow its status write, so a run that is reconciled twice is counted once.
An AdapterMerge's status is written only by ``MergeReconciler.write``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from privatefm_merge import contract, layout
from privatefm_merge.clock import rfc3339, utc_now
from privatefm_merge.errors import MergeError, StorageError

from privatefm_operator import builders, conditions, decisions, metrics, naming, store_policy
from privatefm_operator.api import (
    AdapterMerge,
    AdapterMergeStatus,
    Checkpoint,
    JobRef,
    LearnerNamespace,
    LearnerNamespaceStatus,
    MergePhase,
    MergeTrigger,
)
from privatefm_operator.builders import Learner
from privatefm_operator.queueing import Run, Verdict
from privatefm_operator.reconcilers.base import (
    Clients,
    Invalid,
    Locks,
    RetryLater,
    Stale,
    Step,
    distrust,
    labels_of,
    parse,
    retry_on_conflict,
    status_of,
    termination_message,
    write_status,
)
from privatefm_operator.reconcilers.learner import LearnerReconciler, learner_of
from privatefm_operator.reconcilers.queue import MergeQueue, retry_delay
from privatefm_operator.storage import CredentialsDenied

log = logging.getLogger("privatefm.operator")
TERMINAL = (MergePhase.SUCCEEDED, MergePhase.FAILED)
MESSAGE_LIMIT = 4000


@dataclass
class MergeScope:
    """One pass's working state. ``status`` is what will be written at the end of the pass."""

    am: AdapterMerge | Invalid
    status: AdapterMergeStatus
    lns: LearnerNamespace | None = None
    learner: Learner | None = None
    job: dict[str, Any] | None = None
    result: contract.MergeResult | None = None
    after_write: list[Callable[[], None]] = field(default_factory=list)
    retry_after: float | None = None  # a queued run: pass again after this many seconds
    ended: bool = False               # the run finished in this pass: a queue slot may be free

    @property
    def merge(self) -> AdapterMerge:
        assert isinstance(self.am, AdapterMerge)
        return self.am


def _status_of(am: AdapterMerge | Invalid) -> AdapterMergeStatus:
    return status_of(am, AdapterMergeStatus)


class MergeReconciler:
    def __init__(self, clients: Clients, learners: LearnerReconciler) -> None:
        self.clients = clients
        self.learners = learners
        self.queue = MergeQueue(clients, learners.children)
        self._locks = Locks()
        self._open: set[tuple[str, str]] = set()  # (namespace, name) of runs seen that have not ended

    # ---- entry points ------------------------------------------------------------------------
    def reconcile(self, am: AdapterMerge | Invalid) -> None:
        meta = am.metadata
        with self._locks(meta["namespace"], meta["name"]):
            ended = retry_on_conflict(
                lambda n: self._passes(am if n == 0 else self._fetch(meta["namespace"], meta["name"])))
        if ended and self.queue.limited:  # its slot is free: the runs next up start now, not at their retry
            for run in self.queue.next_up():
                self._pass_again(run.namespace, run.name)

    def _pass_again(self, namespace: str, name: str) -> None:
        """Another run's pass, on this one's behalf: a run still waiting keeps its own retry."""
        try:
            self.reconcile_named(namespace, name)
        except RetryLater as err:
            log.debug("still waiting: %s", err)

    def reconcile_named(self, namespace: str, name: str) -> None:
        """For a Job's event: the AdapterMerge itself must be read, the event carried only the Job."""
        am = self._fetch(namespace, name)
        if am is not None:
            self.reconcile(am)
        else:
            self.queue.forget(namespace, name)

    def has_open_runs(self, namespace: str) -> bool:
        """Whether this process has seen a run in ``namespace`` that has not ended: a pending run turns
        Stalled by the clock (the pending timeout), which no watch event announces."""
        return any(ns == namespace for ns, _ in list(self._open))

    def sweep(self, namespace: str) -> None:
        """Every open run in a learner's namespace, looked at again."""
        for body in self.clients.kube.list("AdapterMerge", namespace):
            am = parse(AdapterMerge, body)
            if _status_of(am).phase not in TERMINAL:
                try:
                    self.reconcile(am)
                except RetryLater as err:  # a queued run: its own handler passes it again
                    log.debug("still waiting: %s", err)

    def _fetch(self, namespace: str, name: str) -> AdapterMerge | Invalid | None:
        body = self.clients.kube.get("AdapterMerge", name, namespace)
        return None if body is None else parse(AdapterMerge, body)

    def _passes(self, am: AdapterMerge | Invalid | None) -> bool:
        """Passes until nothing is left to do; whether the run ended."""
        ended = False
        while am is not None and _status_of(am).phase not in TERMINAL:
            scope = MergeScope(am, _status_of(am).model_copy())
            step = self._run_phases(scope)
            key = (am.metadata["namespace"], am.metadata["name"])
            if step is Step.SKIP:
                self._open.discard(key)
                return ended
            body = self.write(scope)
            for effect in scope.after_write:
                effect()
            ended = ended or scope.ended
            if scope.status.phase in TERMINAL:
                self._open.discard(key)
            else:
                self._open.add(key)
            if scope.retry_after is not None:
                raise RetryLater(f"AdapterMerge {am.metadata['name']}: {scope.status.message}",
                                 delay=scope.retry_after)
            am = parse(AdapterMerge, body) if body is not None and step is Step.REQUEUE else None
        return ended

    def _run_phases(self, scope: MergeScope) -> Step:
        for phase in (self.find_learner, self.plan, self.reclone, self.ensure_job, self.observe_job, self.accept):
            step = phase(scope)
            if step is not Step.CONTINUE:
                return step
        return Step.DONE

    # ---- phases ------------------------------------------------------------------------------
    def find_learner(self, scope: MergeScope) -> Step:
        """The learner whose namespace this is. A namespace's labels alone prove nothing: it must be
        the very namespace that learner's identity maps to. An AdapterMerge anywhere else is ignored."""
        lns, problem = self.learner_of_namespace(scope.am.metadata["namespace"])
        if lns is None:
            self.distrust(scope.am.ref(), "NotALearnerNamespace", problem)
            return Step.SKIP
        if isinstance(scope.am, Invalid):
            return self.finish(scope, MergePhase.FAILED, "InvalidSpec", scope.am.error)
        scope.lns, scope.learner = lns, learner_of(lns)
        return Step.CONTINUE

    def learner_of_namespace(self, namespace: str) -> tuple[LearnerNamespace | None, str]:
        """(the LearnerNamespace that owns ``namespace``, or None and why not)."""
        ns = self.clients.kube.get("Namespace", namespace)
        labels = labels_of(ns)
        name = labels.get(naming.LABEL_LEARNER)
        body = self.clients.kube.get("LearnerNamespace", name) if name else None
        lns = parse(LearnerNamespace, body) if body is not None else None
        if not isinstance(lns, LearnerNamespace):
            return None, f"namespace {namespace} belongs to no LearnerNamespace"
        expected = learner_of(lns)
        if not decisions.is_learner_namespace(namespace, labels, expected.namespace, expected.ns_uid):
            return None, (f"namespace {namespace} is labelled for LearnerNamespace {name}, whose namespace is "
                          f"{expected.namespace}")
        return lns, ""

    def distrust(self, ref: dict[str, Any], reason: str, message: str) -> None:
        distrust(self.clients.kube, ref, reason, f"ignored: {message}")

    def plan(self, scope: MergeScope) -> Step:
        """Picks base, adapter and parent, and assigns the next version."""
        if scope.status.target_version:
            return Step.CONTINUE
        self._ensure_fresh(scope, "planning spends a version")
        learner, lns, storage = scope.learner, scope.lns, self.clients.storage
        assert learner is not None and lns is not None
        spec, lns_status = scope.merge.spec, status_of(lns, LearnerNamespaceStatus)
        if lns_status.last_assigned_version is None:  # its history is not read yet: no version to give
            raise RetryLater(f"LearnerNamespace {lns.name} has not been reconciled yet", delay=2)
        current = decisions.trusted_checkpoint(lns_status, self.learners.checkpoints_uri(learner))
        model = learner.spec.base_model
        try:
            base = decisions.base_version_for_run(spec.base_version, current.base_version if current else None,
                                                  model.version, storage.latest_base_version(model.name))
            log_ = storage.adapter_log(learner.ns_uid)
            base_found = base is not None and storage.base_exists(model.name, base)
        except StorageError as err:
            raise RetryLater(f"store unreachable: {err}", delay=15) from err
        except ValueError as err:  # a malformed privatefm.json sidecar
            return self.finish(scope, MergePhase.FAILED, "AdapterInvalid", str(err))
        adapters_prefix = f"{layout.learner_prefix(learner.ns_uid)}/adapters"
        folded = decisions.adapters_to_fold(log_, spec.adapter_seq)
        adapter = folded[-1] if folded else None
        failure = decisions.plan_failure(model.name, base, base_found, adapter, adapters_prefix,
                                         requested_adapter=spec.adapter_seq,
                                         reclone=spec.trigger == MergeTrigger.FALLBACK)
        if failure is not None:
            return self.finish(scope, MergePhase.FAILED, failure.reason, failure.message)
        target = self.learners.allocate_version(lns, scope.merge.metadata["uid"])
        scope.status = scope.status.model_copy(update={
            "phase": MergePhase.PENDING, "learner": learner.name, "target_version": target,
            "parent_version": current.version if current else None, "base_version": base, "adapter_seq": adapter,
            "adapter_seqs": folded, "reason": "Planned",
            "message": f"v{target} assigned (base v{base}, adapters {folded}); starting the Job",
            "job": JobRef(name=scope.merge.name),
            "conditions": conditions.merge(scope.status.conditions, decisions.merge_conditions(
                MergePhase.PENDING, "Planned", f"v{target} assigned; starting the Job", scope.merge.generation,
                utc_now()))})
        log.info("merge planned", extra={"fields": {"learner": learner.name, "merge": scope.merge.name,
                                                    "version": target, "base": base, "adapters": folded}})
        return Step.REQUEUE

    def reclone(self, scope: MergeScope) -> Step:
        """A Fallback run with no adapter to replay: the new version is a server-side copy of the base."""
        status, learner, lns = scope.status, scope.learner, scope.lns
        if scope.merge.spec.trigger != MergeTrigger.FALLBACK or status.adapter_seqs != []:
            return Step.CONTINUE
        assert learner is not None and lns is not None and status.base_version and status.target_version
        self._ensure_fresh(scope, "a re-clone writes a version")
        model = learner.spec.base_model.name
        try:
            size, sha = self.clients.storage.clone_base(model, status.base_version, learner.ns_uid,
                                                        status.target_version, status.parent_version)
        except StorageError as err:
            raise RetryLater(f"store unreachable: {err}", delay=15) from err
        except MergeError as err:
            return self.finish(scope, MergePhase.FAILED, err.reason.value, str(err))
        checkpoint = Checkpoint(version=status.target_version, uri=self.clients.storage.uri(
            layout.checkpoint_prefix(learner.ns_uid, status.target_version)), manifest_sha256=sha,
            base_version=status.base_version, adapter_seqs=[], size_bytes=size, verified_at=utc_now())
        return self.succeed(scope, checkpoint, "Recloned",
                            f"v{status.target_version} is a server-side copy of base {model} v{status.base_version}")

    def ensure_job(self, scope: MergeScope) -> Step:
        """Creates a manual run's Job (suspended). A Job that never started gets its run's own store
        credentials and its parameters, and is started."""
        am, learner, kube = scope.merge, scope.learner, self.clients.kube
        assert learner is not None and am.namespace is not None
        params = builders.job_params(self.merge_job(learner, scope.status))
        job = kube.get("Job", am.name, am.namespace)
        if job is None and am.spec.trigger != MergeTrigger.SCHEDULED:
            owner = {"apiVersion": am.api_version, "kind": am.kind, "name": am.name, "uid": am.uid,
                     "controller": True, "blockOwnerDeletion": True}
            kube.create(builders.merge_job(learner, self.clients.settings, am.name, am.spec.trigger, params, owner))
            job = kube.get("Job", am.name, am.namespace)
        if job is None:  # a scheduled run whose CronJob Job is gone, or a Job deleted under us
            return self.finish(scope, MergePhase.FAILED, "JobLost", f"Job {am.name} no longer exists")
        if not self.job_is_ours(job, am):
            self.distrust({"apiVersion": "batch/v1", "kind": "Job", "metadata": job["metadata"]}, "ForeignJob",
                          f"Job {am.name} is owned by neither AdapterMerge {am.name} nor the learner's CronJob")
            return self.finish(scope, MergePhase.FAILED, "ForeignJob",
                               f"Job {am.name} was not made for this run; it is not started or read")
        if job["spec"].get("suspend"):
            if self.clients.settings.kueue_queue_name:
                return self.hand_to_kueue(scope, job, params)
            if not self.queue.limited:
                return self.start(scope, job, params)
            run = Run(learner.name, am.metadata.get("creationTimestamp") or "", am.namespace, am.name)
            with self.queue.gate(run) as verdict:
                log.info("merge queue", extra={"fields": {"merge": am.name, "namespace": am.namespace,
                                                          "admitted": verdict.admitted, "position": verdict.position,
                                                          "running": verdict.running, "waiting": verdict.waiting}})
                if verdict.admitted:
                    return self.start(scope, job, params)
            return self.queued(scope, verdict)
        scope.job = job
        return Step.CONTINUE

    def start(self, scope: MergeScope, job: dict[str, Any], params: dict[str, str]) -> Step:
        """Hands the run its credentials and parameters, and un-suspends its Job."""
        am = scope.merge
        step = self.hand_credentials(scope, job)
        if step is not Step.CONTINUE:
            return step
        # Mutable while a Job is suspended and has never started: the run's parameters.
        scope.job = self.clients.kube.patch("Job", am.name, {"spec": {"suspend": False, "template": {"metadata": {
            "annotations": params}}}}, am.namespace)
        return Step.CONTINUE

    def hand_to_kueue(self, scope: MergeScope, job: dict[str, Any], params: dict[str, str]) -> Step:
        """Kueue's contract: a suspended Job labelled with a queue is Kueue's to admit. The Job gets its
        credentials and parameters first, then the label; it stays suspended, and Kueue un-suspends it
        (its event brings the run back here, now running). A Job Kueue suspends again (preemption) waits
        again, with what it already has."""
        am, queue = scope.merge, self.clients.settings.kueue_queue_name
        if labels_of(job).get(naming.KUEUE_QUEUE_LABEL) != queue:
            step = self.hand_credentials(scope, job)
            if step is not Step.CONTINUE:
                return step
            self.clients.kube.patch("Job", am.name, {"metadata": {"labels": {naming.KUEUE_QUEUE_LABEL: queue}},
                                                     "spec": {"template": {"metadata": {"annotations": params}}}},
                                    am.namespace)
        message = f"handed to Kueue: waiting for LocalQueue {queue} to admit Job {am.name}"
        return self._pending(scope, "Queued", message)

    def _pending(self, scope: MergeScope, reason: str, message: str) -> Step:
        status = scope.status
        if (status.phase, status.reason, status.message) != (MergePhase.PENDING, reason, message):
            scope.status = status.model_copy(update={
                "phase": MergePhase.PENDING, "reason": reason, "message": message,
                "conditions": conditions.merge(status.conditions, decisions.merge_conditions(
                    MergePhase.PENDING, reason, message, scope.merge.generation, utc_now()))})
        return Step.DONE

    def queued(self, scope: MergeScope, verdict: Verdict) -> Step:
        """Pending, reason Queued: where the run stands. It is passed again after ``retry_delay``."""
        message = (f"position {verdict.position} in the merge queue: {verdict.running} of at most "
                   f"{self.queue.limit} merge Jobs run, {verdict.waiting} runs wait")
        scope.retry_after = retry_delay(verdict.position)
        return self._pending(scope, "Queued", message)

    def job_is_ours(self, job: dict[str, Any], am: AdapterMerge) -> bool:
        """A Job counts only when its AdapterMerge or the learner's own CronJob owns it (by uid)."""
        if am.spec.trigger != MergeTrigger.SCHEDULED:
            return decisions.owned_by(job["metadata"], "AdapterMerge", am.uid)
        cronjob = self.clients.kube.get("CronJob", naming.CRONJOB, am.namespace)
        return cronjob is not None and decisions.owned_by(job["metadata"], "CronJob", cronjob["metadata"]["uid"])

    def hand_credentials(self, scope: MergeScope, job: dict[str, Any]) -> Step:
        """Mints the run's temporary store credentials, limited to its own inputs and its one target
        version, and writes them into a Secret owned by its Job. They never reach a log or a status."""
        am, learner, status = scope.merge, scope.learner, scope.status
        settings, storage = self.clients.settings, self.clients.storage
        assert learner is not None and status.base_version is not None and status.target_version is not None
        target = layout.checkpoint_prefix(learner.ns_uid, status.target_version)
        policy = store_policy.merge_session_policy(
            storage.bucket, layout.base_prefix(learner.spec.base_model.name, status.base_version),
            f"{layout.learner_prefix(learner.ns_uid)}/adapters", target)
        try:
            credentials = storage.mint_run_credentials(
                policy, store_policy.session_duration_seconds(settings.merge_deadline_seconds),
                session_name=f"{learner.ns_uid}-v{status.target_version}")
        except CredentialsDenied as err:
            return self.finish(scope, MergePhase.FAILED, "CredentialsDenied", str(err))
        except StorageError as err:
            raise RetryLater(f"could not mint run credentials: {err}", delay=15) from err
        if not storage.scoped:
            log.warning("INSECURE: run %s gets the operator's shared store keys", am.name)
        name = naming.SCHEDULED_RUN_SECRET if am.spec.trigger == MergeTrigger.SCHEDULED else naming.run_secret(am.name)
        self.clients.kube.apply(builders.run_secret(learner, name, job,
                                                    credentials.env(settings.s3_endpoint, settings.s3_region)))
        return Step.CONTINUE

    def observe_job(self, scope: MergeScope) -> Step:
        """A finished Job's outcome; an unfinished one's state from its pods (Running only while a pod
        runs; Pending with the scheduler's reason, and Stalled past the pending timeout)."""
        job = scope.job or {}
        job_status = job.get("status") or {}
        message = self._termination_message(scope) if decisions.job_finished(job_status) else None
        outcome = decisions.job_outcome(job_status, message)
        scope.result = outcome.result
        if outcome.phase in (MergePhase.PENDING, MergePhase.RUNNING):
            am, now = scope.merge, utc_now()
            pods = self.clients.kube.list("Pod", am.namespace or "", selector=f"{naming.JOB_NAME_LABEL}={am.name}")
            outcome = decisions.pod_progress(job, pods, now, timedelta(
                seconds=self.clients.settings.merge_pending_timeout_seconds))
            status = scope.status
            started = status.started_at or (now if outcome.phase == MergePhase.RUNNING else None)
            stalled = conditions.find(status.conditions, conditions.STALLED)
            was_stalled = stalled is not None and stalled.status.value == "True"
            if (status.phase, status.reason, status.message, was_stalled) != (
                    outcome.phase, outcome.reason, outcome.message[:MESSAGE_LIMIT], outcome.stalled):
                scope.status = status.model_copy(update={
                    "phase": outcome.phase, "started_at": started, "reason": outcome.reason,
                    "message": outcome.message[:MESSAGE_LIMIT],
                    "conditions": conditions.merge(status.conditions, decisions.merge_conditions(
                        outcome.phase, outcome.reason, outcome.message[:MESSAGE_LIMIT], am.generation, now,
                        stalled=outcome.stalled))})
                if outcome.stalled and not was_stalled:
                    scope.after_write.append(lambda: self.clients.kube.event(
                        am.ref(), "Warning", "MergeStalled", f"{outcome.reason}: {outcome.message}"[:1024]))
            return Step.DONE
        if outcome.phase == MergePhase.FAILED or outcome.result is None:
            return self.finish(scope, MergePhase.FAILED, outcome.reason, outcome.message)
        return Step.CONTINUE

    def accept(self, scope: MergeScope) -> Step:
        """Check the checkpoint in the store itself (its upload checksums: no model bytes); only then
        is it a checkpoint."""
        learner, lns, result, status = scope.learner, scope.lns, scope.result, scope.status
        assert learner is not None and lns is not None and result is not None and status.target_version
        target = status.target_version
        prefix = layout.checkpoint_prefix(learner.ns_uid, target)
        uri = self.clients.storage.uri(prefix)
        self._ensure_fresh(scope, "accepting a checkpoint moves currentCheckpoint")
        try:
            report = self.clients.storage.verify(prefix)
        except StorageError as err:
            raise RetryLater(f"could not read {uri}: {err}", delay=15) from err
        if not report.exists or report.manifest is None or report.manifest_sha256 is None:
            verdict = decisions.Acceptance(False, "VerificationFailed", f"{uri}: {report.message}")
        else:
            verdict = decisions.accept_checkpoint(result, target, report.manifest_sha256, report.manifest.version,
                                                  report.bad_files)
        if not verdict.accepted:
            return self.finish(scope, MergePhase.FAILED, verdict.reason, verdict.message)
        assert report.manifest_sha256 is not None and status.base_version is not None
        checkpoint = Checkpoint(version=target, uri=uri, manifest_sha256=report.manifest_sha256,
                                base_version=status.base_version, adapter_seq=status.adapter_seq,
                                adapter_seqs=status.adapter_seqs, size_bytes=report.total_bytes,
                                verified_at=utc_now())
        return self.succeed(scope, checkpoint, verdict.reason, verdict.message)

    def succeed(self, scope: MergeScope, checkpoint: Checkpoint, reason: str, message: str) -> Step:
        """Makes a verified checkpoint current, records it in the learner's event log, and finishes."""
        learner, lns = scope.learner, scope.lns
        assert learner is not None and lns is not None
        # Before the run is marked done, so a crash in between advances on the next pass.
        self.learners.advance(lns, checkpoint)
        scope.after_write += [
            lambda: metrics.CHECKPOINT_SIZE.observe(checkpoint.size_bytes or 0),
            lambda: self.clients.storage.append_event(learner.ns_uid, "merge", {
                "type": "MergeCompleted", "version": checkpoint.version, "baseVersion": checkpoint.base_version,
                "adapterSeq": checkpoint.adapter_seq, "adapterSeqs": checkpoint.adapter_seqs,
                "manifestSha256": checkpoint.manifest_sha256, "merge": scope.merge.name,
                "trigger": scope.merge.spec.trigger.value, "at": rfc3339(checkpoint.verified_at)}),
        ]
        return self.finish(scope, MergePhase.SUCCEEDED, reason, message, checkpoint)

    def finish(self, scope: MergeScope, phase: MergePhase, reason: str, message: str,
               checkpoint: Checkpoint | None = None) -> Step:
        """Records the outcome; its Events and metrics follow the status write."""
        succeeded, message = phase == MergePhase.SUCCEEDED, message[:MESSAGE_LIMIT]
        generation = scope.am.metadata.get("generation")
        duration = scope.result.duration_seconds if scope.result else None
        scope.status = scope.status.model_copy(update={
            "phase": phase, "reason": reason, "message": message, "completed_at": utc_now(),
            "duration_seconds": duration if duration is not None else scope.status.duration_seconds,
            "checkpoint": checkpoint or scope.status.checkpoint,
            "conditions": conditions.merge(scope.status.conditions, decisions.merge_conditions(
                phase, reason, message, generation, utc_now()))})
        scope.after_write.insert(0, lambda: self._announce(scope, phase, reason, message, checkpoint))
        scope.ended = True
        scope.after_write.append(lambda: self.queue.forget(scope.am.metadata["namespace"], scope.am.metadata["name"]))
        if not succeeded:
            scope.after_write.append(lambda: self._abort_uploads(scope))
        if scope.lns is not None:  # its lag, or its fallback, moves on
            lns_name = scope.lns.name
            scope.after_write.append(lambda: self.learners.refresh(lns_name))
        return Step.DONE

    def _abort_uploads(self, scope: MergeScope) -> None:
        """A failed run may leave unfinished multipart uploads in its version; they cost storage and
        are never completed. (A lifecycle rule on the bucket is the backstop: docs/store.md.)"""
        learner, status = scope.learner, scope.status
        if learner is None or status.target_version is None or status.base_version is None:
            return
        prefix = layout.checkpoint_prefix(learner.ns_uid, status.target_version)
        try:
            names = self.clients.storage.base_files(learner.spec.base_model.name, status.base_version)
            aborted = self.clients.storage.abort_uploads(prefix, names)
        except (StorageError, ValueError) as err:
            log.warning("could not abort unfinished uploads under %s: %s", prefix, err)
            return
        if aborted:
            log.info("aborted unfinished uploads", extra={"fields": {"prefix": prefix, "uploads": aborted}})

    def _announce(self, scope: MergeScope, phase: MergePhase, reason: str, message: str,
                  checkpoint: Checkpoint | None) -> None:
        meta, kube = scope.am.metadata, self.clients.kube
        succeeded = phase == MergePhase.SUCCEEDED
        trigger = scope.am.spec.trigger.value if isinstance(scope.am, AdapterMerge) else MergeTrigger.MANUAL.value
        metrics.MERGE_OPERATIONS.labels(trigger=trigger, result="succeeded" if succeeded else "failed").inc()
        if scope.result is not None and scope.result.duration_seconds:
            metrics.MERGE_DURATION.observe(scope.result.duration_seconds)
        version = scope.status.target_version
        if succeeded:
            type_, event = "Normal", "MergeCompleted"
            text = f"checkpoint v{version} verified ({checkpoint.size_bytes if checkpoint else None} bytes)"
        else:
            type_, event, text = "Warning", "MergeFailed", f"{reason}: {message}"
        kube.event(scope.am.ref(), type_, event, text)
        if scope.lns is not None:
            kube.event(scope.lns.ref(), type_, event, f"{meta['name']}: {text}")
        log.info("merge finished", extra={"fields": {"merge": meta["name"], "namespace": meta["namespace"],
                                                     "phase": phase.value, "reason": reason, "version": version}})

    # ---- the one status write ----------------------------------------------------------------
    def write(self, scope: MergeScope) -> dict[str, Any] | None:
        return write_status(self.clients.kube, "AdapterMerge", scope.am.metadata, _status_of(scope.am),
                            scope.status, observed=True)

    # ---- helpers -----------------------------------------------------------------------------
    def _ensure_fresh(self, scope: MergeScope, why: str) -> None:
        """A fresh read, where acting on a stale body would cost something (``why``): the body we were
        handed (an event's, or the sweep's list) may predate what another pass has since written."""
        fresh = self._fetch(scope.merge.namespace or "", scope.merge.name)
        if fresh is None or fresh.metadata.get("resourceVersion") != scope.am.metadata.get("resourceVersion"):
            log.debug("stale AdapterMerge %s before %s", scope.merge.name, why)
            raise Stale(scope.merge.name)

    def merge_job(self, learner: Learner, status: AdapterMergeStatus) -> contract.MergeJob:
        model, storage = learner.spec.base_model.name, self.clients.storage
        assert status.base_version is not None and status.target_version
        seqs = status.adapter_seqs if status.adapter_seqs is not None else [status.adapter_seq]
        return contract.MergeJob(
            base_uri=storage.uri(layout.base_prefix(model, status.base_version)),
            adapters=tuple(contract.AdapterRef(seq, storage.uri(layout.adapter_prefix(learner.ns_uid, seq)))
                           for seq in seqs if seq is not None),
            output_uri=storage.uri(layout.checkpoint_prefix(learner.ns_uid, status.target_version)),
            base_model=model, base_version=status.base_version, parent_version=status.parent_version,
            target_version=status.target_version)

    def _termination_message(self, scope: MergeScope) -> str | None:
        return termination_message(self.clients.kube, scope.merge.namespace or "", scope.merge.name)
