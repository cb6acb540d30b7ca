"""The deep check: a verify Job that rehashes one checkpoint, on CPU, with read-only store access.

    start   = create the Job (suspended) → mint read-only credentials for that one checkpoint →
              a Secret owned by the Job → un-suspend
    outcome = the Job's status + its pod's termination message → ``deep_check.VerifyOutcome``
    delete  = the Job (its pod and Secret go with it)

The learner reconciler decides when to check and what a verdict means; this only runs the Jobs.
A Job counts as a deep check only when it carries the verify labels of this learner and no owner
(an AdapterMerge's or the CronJob's Job of the same name is a merge, never read or deleted here).
"""

from __future__ import annotations

import logging
from typing import Any

from privatefm_merge import layout
from privatefm_merge.errors import StorageError

from privatefm_operator import builders, decisions, naming, store_policy
from privatefm_operator.builders import Learner
from privatefm_operator.deep_check import FOREIGN_JOB, JOB_LOST, VerifyOutcome, outcome_of
from privatefm_operator.reconcilers.base import Clients, RetryLater, distrust, labels_of, termination_message

log = logging.getLogger("privatefm.operator")


class VerifyConflict(Exception):
    """A Job of the verify Job's name exists that the operator did not make for this deep check."""


def _job_ref(job: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": job["metadata"]}


def not_a_verify_job(job: dict[str, Any], ns_uid: str | None = None, uri: str | None = None) -> str:
    """Why ``job`` is not one of our verify Jobs (of learner ``ns_uid``, checking ``uri``); "" when it is."""
    labels, name = labels_of(job), job["metadata"]["name"]
    if labels.get(naming.LABEL_MANAGED_BY) != naming.MANAGED_BY or \
            labels.get(naming.LABEL_COMPONENT) != builders.VERIFY_COMPONENT:
        return f"Job {name} is not a verify Job"
    if job["metadata"].get("ownerReferences"):
        return f"Job {name} has owners; a verify Job has none"
    if ns_uid is not None and labels.get(naming.LABEL_NS_UID) != ns_uid:
        return f"Job {name} is labelled for another learner"
    if uri is not None and _command(job) != builders.verify_command(uri):
        return f"Job {name} does not check {uri}"
    return ""


def _command(job: dict[str, Any]) -> list[str]:
    containers = job["spec"]["template"]["spec"].get("containers") or [{}]
    return list(containers[0].get("command") or [])


class VerifyChecks:
    def __init__(self, clients: Clients) -> None:
        self.clients = clients

    def start(self, learner: Learner, version: int, uri: str, name: str) -> None:
        """Starts the deep check ``name`` of ``learner``'s checkpoint ``version`` (at ``uri``).

        Idempotent: a verify Job of that name that is already running (or done) is left alone; one
        left suspended (the operator stopped half-way) gets fresh credentials and is started.
        Raises ``ValueError`` when ``uri`` is not that checkpoint's, ``VerifyConflict`` when a Job of
        that name is not ours, ``RetryLater`` when the store's STS cannot be reached, and
        ``storage.CredentialsDenied`` when STS refuses (a configuration problem).
        """
        kube, storage, settings = self.clients.kube, self.clients.storage, self.clients.settings
        prefix = layout.checkpoint_prefix(learner.ns_uid, version)
        if uri != storage.uri(prefix):
            raise ValueError(f"{uri} is not checkpoint v{version} of learner {learner.name} ({storage.uri(prefix)})")
        job = kube.get("Job", name, learner.namespace)
        if job is None:
            kube.create(builders.verify_job(learner, settings, name, version, uri, naming.verify_secret(name)))
            job = kube.get("Job", name, learner.namespace)
            if job is None:
                raise RetryLater(f"verify Job {name} vanished right after it was created", delay=2)
        problem = not_a_verify_job(job, learner.ns_uid, uri)
        if problem:
            distrust(kube, _job_ref(job), FOREIGN_JOB, f"not started as a deep check: {problem}")
            raise VerifyConflict(problem)
        if not job["spec"].get("suspend"):
            return
        # Read-only, and only that one checkpoint: the Job cannot change what it checks.
        policy = store_policy.verify_session_policy(storage.bucket, prefix)
        try:
            credentials = storage.mint_run_credentials(
                policy, store_policy.session_duration_seconds(builders.VERIFY_DEADLINE_SECONDS),
                session_name=f"{learner.ns_uid}-{name}")
        except StorageError as err:
            raise RetryLater(f"could not mint verify credentials: {err}", delay=15) from err
        if not storage.scoped:
            log.warning("INSECURE: verify Job %s gets the operator's shared store keys", name)
        kube.apply(builders.run_secret(learner, naming.verify_secret(name), job,
                                       credentials.env(settings.s3_endpoint, settings.s3_region),
                                       component=builders.VERIFY_COMPONENT))
        kube.patch("Job", name, {"spec": {"suspend": False}}, learner.namespace)
        log.info("deep check started", extra={"fields": {"learner": learner.name, "job": name, "version": version}})

    def outcome(self, namespace: str, name: str, expected_manifest_sha256: str | None = None) -> VerifyOutcome | None:
        """The verdict of verify Job ``name``; None while it runs (or waits to start).

        ``expected_manifest_sha256``: the accepted checkpoint's (``currentCheckpoint.manifestSha256``);
        a different manifest.json is ``ChecksumMismatch`` of ``manifest.json``. A Job that is gone
        (``VerifyJobLost``), not ours (``ForeignJob``) or ended without a result (``VerifyJobFailed``)
        is not passed and not ``corrupt``: check again.
        """
        kube = self.clients.kube
        job = kube.get("Job", name, namespace)
        if job is None:
            return VerifyOutcome(False, JOB_LOST, None, f"verify Job {name} no longer exists")
        problem = not_a_verify_job(job)
        if problem:
            distrust(kube, _job_ref(job), FOREIGN_JOB, f"its result is not read: {problem}")
            return VerifyOutcome(False, FOREIGN_JOB, None, problem)
        command = _command(job)
        uri = command[2] if len(command) > 2 else ""
        job_status = job.get("status") or {}
        if not decisions.job_finished(job_status):
            return None  # cheap: no pod list while it runs
        message = termination_message(kube, namespace, name)
        return outcome_of(job_status, message, uri, expected_manifest_sha256)

    def delete(self, namespace: str, name: str) -> bool:
        """Deletes verify Job ``name`` with its pod and Secret; False when there was none of ours."""
        kube = self.clients.kube
        job = kube.get("Job", name, namespace)
        if job is None or not_a_verify_job(job):
            return False
        return kube.delete("Job", name, namespace, propagation="Background")
