"""Reconcile logic: reads top to bottom, calls pure builders and decisions, does I/O through
``kube`` and ``storage`` only. Every function is idempotent and safe to run again after a crash."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import defaultdict
from typing import Any

from privatefm_merge import contract, layout
from pydantic import ValidationError

from privatefm_operator import builders, conditions, decisions, metrics, naming
from privatefm_operator.api import (
    AdapterMergeSpec,
    LearnerNamespace,
    LearnerPhase,
    MergePhase,
    MergeTrigger,
)
from privatefm_operator.builders import Learner
from privatefm_operator.kube import Kube, is_conflict
from privatefm_operator.settings import Settings
from privatefm_operator.storage import STORE_ERRORS, Storage

log = logging.getLogger("privatefm.operator")
TERMINAL = {MergePhase.SUCCEEDED.value, MergePhase.FAILED.value}


class RetryLater(Exception):
    """Something outside our control is not ready yet; the handler retries after ``delay``."""

    def __init__(self, message: str, delay: float = 5.0) -> None:
        super().__init__(message)
        self.delay = delay


class Operator:
    def __init__(self, kube: Kube, storage: Storage, settings: Settings) -> None:
        self.kube = kube
        self.storage = storage
        self.settings = settings
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._known: set[str] = set()

    # ==== LearnerNamespace ======================================================================
    def learner(self, body: dict[str, Any]) -> Learner:
        lns = LearnerNamespace.model_validate(body)
        status = lns.status
        uid = (status.ns_uid if status and status.ns_uid else None) or naming.ns_uid(body["metadata"]["uid"])
        return Learner(name=body["metadata"]["name"], uid=body["metadata"]["uid"], ns_uid=uid,
                       namespace=naming.namespace_name(lns.spec.learner_id, uid), spec=lns.spec)

    def reconcile_learner(self, name: str) -> None:
        with self._locks[("", name)]:
            body = self.kube.get("LearnerNamespace", name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return
            self._known.add(name)
            metrics.LEARNER_NAMESPACES.set(len(self._known))
            status = body.get("status") or {}
            generation = body["metadata"].get("generation")
            try:
                learner = self.learner(body)
            except ValidationError as err:  # the CRD schema should have caught it; say so, do nothing
                self._write_learner_status(name, status, LearnerPhase.FAILED, conditions.kstatus(
                    generation, ready=False, reconciling=False, stalled=True, reason="InvalidSpec",
                    message=str(err)[:2000]), observedGeneration=generation)
                return

            created = self._provision(learner)
            latest, base_problem = self._base_model_state(learner)
            current = status.get("currentCheckpoint") or {}
            lag = decisions.version_lag(latest, current.get("baseVersion"))

            if base_problem:
                phase, ready, stalled = LearnerPhase.FAILED, False, True
                reason, message = "BaseModelNotFound", base_problem
            else:
                phase, ready, stalled = LearnerPhase.READY, True, False
                reason = "CheckpointVerified" if current else "Provisioned"
                message = (f"namespace {learner.namespace} provisioned; "
                           + (f"checkpoint v{current['version']} verified" if current else "no checkpoint yet"))
            degraded = lag is not None and lag > self.settings.max_version_lag
            new_conditions = conditions.kstatus(generation, ready=ready, reconciling=False, stalled=stalled,
                                                reason=reason, message=message)
            new_conditions.append(conditions.condition(
                conditions.DEGRADED, degraded, "VersionLag" if degraded else "WithinLag",
                f"checkpoint is {lag} base versions behind (max {self.settings.max_version_lag})"
                if degraded else "", generation))
            if degraded and not base_problem:
                phase = LearnerPhase.DEGRADED
            self._write_learner_status(name, status, phase, new_conditions, observedGeneration=generation,
                                       nsUid=learner.ns_uid, namespace=learner.namespace,
                                       baseModelLatestVersion=latest, versionLag=lag)
            if created:
                self.kube.event(body, "Normal", "NamespaceCreated", f"created namespace {learner.namespace}")
                log.info("namespace created", extra={"fields": {"learner": name, "namespace": learner.namespace}})

        # A safety net for missed Job events: every open run of this learner is looked at again.
        for am in self.kube.list("AdapterMerge", learner.namespace):
            if (am.get("status") or {}).get("phase") not in TERMINAL:
                self.sync_merge(learner.namespace, am["metadata"]["name"])

    def _write_learner_status(self, name: str, old: dict[str, Any], phase: LearnerPhase,
                              new_conditions: list[dict[str, Any]], **fields: Any) -> None:
        """One status write per reconcile; conditions keep their transition times."""
        self.kube.patch("LearnerNamespace", name, {"status": {
            **fields, "phase": phase.value,
            "conditions": conditions.merge(old.get("conditions") or [], new_conditions)}}, subresource="status")

    def _provision(self, learner: Learner) -> bool:
        """Applies the Namespace and its children. Returns True when the Namespace was new."""
        existing = self.kube.get("Namespace", learner.namespace)
        if existing and existing.get("status", {}).get("phase") == "Terminating":
            raise RetryLater(f"namespace {learner.namespace} is terminating", delay=10)
        self.kube.apply(builders.namespace(learner))
        for child in builders.children(learner, self.settings):
            self.kube.apply(child)
        return existing is None

    def _base_model_state(self, learner: Learner) -> tuple[int | None, str]:
        model = learner.spec.base_model
        try:
            latest = self.storage.latest_base_version(model.name)
            if model.version is not None and not self.storage.base_exists(model.name, model.version):
                return latest, f"base model {model.name} v{model.version} is not in the store"
        except STORE_ERRORS as err:
            raise RetryLater(f"store unreachable: {err}", delay=15) from err
        if latest is None and model.version is None:
            return None, f"base model {model.name} has no published version in the store"
        return latest, ""

    def forget_learner(self, name: str) -> None:
        self._known.discard(name)
        metrics.LEARNER_NAMESPACES.set(len(self._known))

    # ==== Jobs made by the CronJob ==============================================================
    def on_job(self, job: dict[str, Any]) -> None:
        """Every Job of ours gets its AdapterMerge record; then that run is brought up to date."""
        meta = job["metadata"]
        if meta.get("deletionTimestamp"):
            return
        labels = meta.get("labels") or {}
        # Only a CronJob's Job that is still suspended can lack its record: we un-suspend after recording.
        if labels.get(naming.LABEL_TRIGGER) == MergeTrigger.SCHEDULED.value and job["spec"].get("suspend"):
            self.kube.create({
                "apiVersion": "privatefm.io/v1alpha1", "kind": "AdapterMerge",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                             "labels": {k: v for k, v in labels.items() if k.startswith("privatefm.io/")}},
                "spec": AdapterMergeSpec(trigger=MergeTrigger.SCHEDULED,
                                         reason="the nightly CronJob fired").wire(),
            })
        self.sync_merge(meta["namespace"], meta["name"])

    # ==== AdapterMerge ==========================================================================
    def sync_merge(self, namespace: str, name: str) -> None:
        with self._locks[(namespace, name)]:
            am = self.kube.get("AdapterMerge", name, namespace)
            if am is None or (am.get("status") or {}).get("phase") in TERMINAL:
                return
            lns_body = self._learner_of(namespace)
            if lns_body is None:
                self._finish(am, None, MergePhase.FAILED, "LearnerNotFound",
                             f"namespace {namespace} belongs to no LearnerNamespace")
                return
            try:
                learner = self.learner(lns_body)
                AdapterMergeSpec.model_validate(am.get("spec") or {})
            except ValidationError as err:
                self._finish(am, lns_body, MergePhase.FAILED, "InvalidSpec", str(err))
                return
            status = am.get("status") or {}
            if not status.get("targetVersion"):
                planned = self._plan(am, lns_body, learner)
                if planned is None:
                    return
                status = planned
            job = self._ensure_job(am, learner, status)
            if job is None:
                self._finish(am, lns_body, MergePhase.FAILED, "JobLost", f"Job {name} no longer exists")
                return
            job_status = job.get("status") or {}
            message = self._termination_message(namespace, name) if decisions.job_finished(job_status) else None
            outcome = decisions.job_outcome(job_status, message)
            if outcome.phase in (MergePhase.PENDING, MergePhase.RUNNING):
                if status.get("phase") != outcome.phase.value:
                    patch: dict[str, Any] = {"phase": outcome.phase.value}
                    if outcome.phase == MergePhase.RUNNING:
                        patch["startedAt"] = conditions.now()
                    patch["conditions"] = conditions.merge(status.get("conditions") or [], conditions.kstatus(
                        am["metadata"].get("generation"), ready=False, reconciling=True, stalled=False,
                        reason=outcome.reason, message=outcome.message))
                    self.kube.patch("AdapterMerge", name, {"status": patch}, namespace, subresource="status")
                return
            if outcome.phase == MergePhase.FAILED or outcome.result is None:
                self._finish(am, lns_body, MergePhase.FAILED, outcome.reason, outcome.message, outcome.result)
                return
            self._accept(am, lns_body, learner, status, outcome.result)

    def _learner_of(self, namespace: str) -> dict[str, Any] | None:
        ns = self.kube.get("Namespace", namespace)
        name = ((ns or {}).get("metadata", {}).get("labels") or {}).get(naming.LABEL_LEARNER)
        return self.kube.get("LearnerNamespace", name) if name else None

    def _plan(self, am: dict[str, Any], lns_body: dict[str, Any], learner: Learner) -> dict[str, Any] | None:
        """Picks base, adapter and parent, assigns the next version, and records it before any Job exists."""
        spec = AdapterMergeSpec.model_validate(am.get("spec") or {})
        current = (lns_body.get("status") or {}).get("currentCheckpoint") or {}
        try:
            latest = self.storage.latest_base_version(learner.spec.base_model.name)
            base_version = decisions.base_version_for_run(spec.base_version, current.get("baseVersion"),
                                                          learner.spec.base_model.version, latest)
            adapter_seq = spec.adapter_seq if spec.adapter_seq is not None else \
                self.storage.latest_adapter_seq(learner.ns_uid)
            base_ok = base_version is not None and self.storage.base_exists(learner.spec.base_model.name,
                                                                             base_version)
        except STORE_ERRORS as err:
            raise RetryLater(f"store unreachable: {err}", delay=15) from err
        if not base_ok:
            self._finish(am, lns_body, MergePhase.FAILED, "BaseModelNotFound",
                         f"base model {learner.spec.base_model.name} v{base_version} is not in the store")
            return None
        if adapter_seq is None:
            self._finish(am, lns_body, MergePhase.FAILED, "NoAdapter",
                         f"no adapter under {layout.learner_prefix(learner.ns_uid)}/adapters/")
            return None
        assert base_version is not None
        target = self._allocate_version(lns_body["metadata"]["name"])
        status = {
            "phase": MergePhase.PENDING.value, "learner": learner.name, "targetVersion": target,
            "parentVersion": current.get("version"), "baseVersion": base_version, "adapterSeq": adapter_seq,
            "job": {"name": am["metadata"]["name"]}, "observedGeneration": am["metadata"].get("generation"),
        }
        self.kube.patch("AdapterMerge", am["metadata"]["name"], {"status": status}, am["metadata"]["namespace"],
                        subresource="status")
        log.info("merge planned", extra={"fields": {"learner": learner.name, "merge": am["metadata"]["name"],
                                                    "version": target, "base": base_version,
                                                    "adapter": adapter_seq}})
        return status

    def _allocate_version(self, lns_name: str) -> int:
        """Next version for this learner, written with optimistic concurrency: never handed out twice."""
        for _ in range(20):
            body = self.kube.get("LearnerNamespace", lns_name)
            if body is None:
                raise RetryLater(f"LearnerNamespace {lns_name} disappeared")
            status = body.get("status") or {}
            version = decisions.next_version(status.get("lastAssignedVersion"),
                                             (status.get("currentCheckpoint") or {}).get("version"))
            try:
                self.kube.patch("LearnerNamespace", lns_name, {
                    "metadata": {"resourceVersion": body["metadata"]["resourceVersion"]},
                    "status": {"lastAssignedVersion": version}}, subresource="status")
                return version
            except Exception as err:
                if not is_conflict(err):
                    raise
        raise RetryLater("could not assign a version: too many concurrent updates", delay=1)

    def merge_job(self, learner: Learner, status: dict[str, Any]) -> contract.MergeJob:
        model = learner.spec.base_model.name
        return contract.MergeJob(
            base_uri=self.storage.uri(layout.base_prefix(model, status["baseVersion"])),
            adapter_uri=self.storage.uri(layout.adapter_prefix(learner.ns_uid, status["adapterSeq"])),
            output_uri=self.storage.uri(layout.checkpoint_prefix(learner.ns_uid, status["targetVersion"])),
            base_model=model, base_version=status["baseVersion"], parent_version=status.get("parentVersion"),
            target_version=status["targetVersion"])

    def _ensure_job(self, am: dict[str, Any], learner: Learner, status: dict[str, Any]) -> dict[str, Any] | None:
        name, namespace = am["metadata"]["name"], am["metadata"]["namespace"]
        params = builders.job_params(self.merge_job(learner, status))
        trigger = MergeTrigger(AdapterMergeSpec.model_validate(am.get("spec") or {}).trigger)
        job = self.kube.get("Job", name, namespace)
        if job is None:
            if trigger == MergeTrigger.SCHEDULED:
                return None  # the CronJob's Job is gone; nothing to run
            owner = {"apiVersion": am["apiVersion"], "kind": "AdapterMerge", "name": name,
                     "uid": am["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
            self.kube.create(builders.merge_job(learner, self.settings, name, trigger, params, owner))
            job = self.kube.get("Job", name, namespace)
        elif job["spec"].get("suspend"):
            # Mutable while a Job is suspended and has never started: the run's parameters.
            job = self.kube.patch("Job", name, {"spec": {"suspend": False, "template": {"metadata": {
                "annotations": params}}}}, namespace)
        return job

    def _termination_message(self, namespace: str, job_name: str) -> str | None:
        pods = self.kube.list("Pod", namespace, selector=f"{naming.JOB_NAME_LABEL}={job_name}")
        for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True):
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                terminated = (cs.get("state") or {}).get("terminated")
                if terminated and terminated.get("message"):
                    return str(terminated["message"])
        return None

    def _accept(self, am: dict[str, Any], lns_body: dict[str, Any], learner: Learner, status: dict[str, Any],
                result: contract.MergeResult) -> None:
        """Verify the checkpoint from the store itself; only then is it a checkpoint."""
        target = int(status["targetVersion"])
        uri = self.storage.uri(layout.checkpoint_prefix(learner.ns_uid, target))
        try:
            report = self.storage.verify(uri)
        except STORE_ERRORS as err:
            raise RetryLater(f"could not read {uri}: {err}", delay=15) from err
        if not report.exists or report.manifest is None or report.manifest_sha256 is None:
            verdict = decisions.Acceptance(False, "VerificationFailed", f"{uri}: {report.message}")
        else:
            verdict = decisions.accept_checkpoint(result, target, report.manifest_sha256, report.manifest.version,
                                                  report.bad_files)
        if not verdict.accepted:
            self._finish(am, lns_body, MergePhase.FAILED, verdict.reason, verdict.message, result)
            return
        assert report.manifest_sha256 is not None
        checkpoint = {"version": target, "uri": uri, "manifestSha256": report.manifest_sha256,
                      "baseVersion": status["baseVersion"], "adapterSeq": status.get("adapterSeq"),
                      "sizeBytes": report.total_bytes, "verifiedAt": conditions.now()}
        self._advance(lns_body["metadata"]["name"], checkpoint)
        self._finish(am, lns_body, MergePhase.SUCCEEDED, verdict.reason, verdict.message, result, checkpoint)
        metrics.CHECKPOINT_SIZE.observe(report.total_bytes)
        self.storage.append_event(learner.ns_uid, "merge", {
            "type": "MergeCompleted", "version": target, "baseVersion": status["baseVersion"],
            "adapterSeq": status.get("adapterSeq"), "manifestSha256": report.manifest_sha256,
            "merge": am["metadata"]["name"], "at": conditions.now()})

    def _advance(self, lns_name: str, checkpoint: dict[str, Any]) -> None:
        """Moves currentCheckpoint forward (never back), with optimistic concurrency."""
        for _ in range(20):
            body = self.kube.get("LearnerNamespace", lns_name)
            if body is None:
                return
            status = body.get("status") or {}
            current = (status.get("currentCheckpoint") or {}).get("version")
            if not decisions.should_advance(current, checkpoint["version"]):
                return
            lag = decisions.version_lag(status.get("baseModelLatestVersion"), checkpoint["baseVersion"])
            try:
                self.kube.patch("LearnerNamespace", lns_name, {
                    "metadata": {"resourceVersion": body["metadata"]["resourceVersion"]},
                    "status": {"currentCheckpoint": checkpoint, "versionLag": lag}}, subresource="status")
                return
            except Exception as err:
                if not is_conflict(err):
                    raise
        raise RetryLater("could not advance the checkpoint: too many concurrent updates", delay=1)

    def _finish(self, am: dict[str, Any], lns_body: dict[str, Any] | None, phase: MergePhase, reason: str,
                message: str, result: contract.MergeResult | None = None,
                checkpoint: dict[str, Any] | None = None) -> None:
        meta = am["metadata"]
        succeeded = phase == MergePhase.SUCCEEDED
        status = am.get("status") or {}
        patch: dict[str, Any] = {
            "phase": phase.value, "reason": reason, "message": message[:4000],
            "completedAt": conditions.now(), "observedGeneration": meta.get("generation"),
            "conditions": conditions.merge(status.get("conditions") or [], conditions.kstatus(
                meta.get("generation"), ready=succeeded, reconciling=False, stalled=not succeeded,
                reason=reason, message=message[:4000])),
        }
        if result is not None:
            patch["durationSeconds"] = result.duration_seconds
        if checkpoint:
            patch["checkpoint"] = checkpoint
        self.kube.patch("AdapterMerge", meta["name"], {"status": patch}, meta["namespace"], subresource="status")
        trigger = (am.get("spec") or {}).get("trigger", MergeTrigger.MANUAL.value)
        metrics.MERGE_OPERATIONS.labels(trigger=trigger, result="succeeded" if succeeded else "failed").inc()
        if result is not None and result.duration_seconds:
            metrics.MERGE_DURATION.observe(result.duration_seconds)
        version = status.get("targetVersion")
        if succeeded:
            text = f"checkpoint v{version} verified ({checkpoint and checkpoint.get('sizeBytes')} bytes)"
            self.kube.event(am, "Normal", "MergeCompleted", text)
            if lns_body:
                self.kube.event(lns_body, "Normal", "MergeCompleted", f"{meta['name']}: {text}")
        else:
            text = f"{reason}: {message}"
            self.kube.event(am, "Warning", "MergeFailed", text)
            if lns_body:
                self.kube.event(lns_body, "Warning", "MergeFailed", f"{meta['name']}: {text}")
        log.info("merge finished", extra={"fields": {"merge": meta["name"], "namespace": meta["namespace"],
                                                     "phase": phase.value, "reason": reason, "version": version}})


def timed(kind: str) -> Any:
    """Decorator: reconcile latency and error metrics."""
    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                return fn(*args, **kwargs)
            except Exception:
                metrics.RECONCILE_ERRORS.labels(kind=kind).inc()
                raise
            finally:
                metrics.RECONCILE_DURATION.labels(kind=kind).observe(time.monotonic() - start)
        return inner
    return wrap
