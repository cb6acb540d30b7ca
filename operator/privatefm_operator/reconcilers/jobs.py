"""Job events: every merge Job of ours has its AdapterMerge record, and its progress moves that run.
Verify Jobs (the deep check) are not merges and are ignored here.

    on_job = record a scheduled run (a suspended CronJob Job has none yet) → reconcile its AdapterMerge
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from privatefm_operator import builders, decisions, naming
from privatefm_operator.api import AdapterMerge, AdapterMergeSpec, MergeTrigger
from privatefm_operator.reconcilers.base import Clients
from privatefm_operator.reconcilers.merge import MergeReconciler


def scheduled_run(job: Mapping[str, Any]) -> dict[str, Any] | None:
    """The AdapterMerge that records a CronJob's Job, or None when the Job needs none.

    Only a CronJob's Job that is still suspended can lack its record: the operator un-suspends
    a Job only after recording it."""
    meta, labels = job["metadata"], job["metadata"].get("labels") or {}
    if labels.get(naming.LABEL_TRIGGER) != MergeTrigger.SCHEDULED.value or not job["spec"].get("suspend"):
        return None
    return AdapterMerge(
        metadata={"name": meta["name"], "namespace": meta["namespace"],
                  "labels": {k: v for k, v in labels.items() if k.startswith(f"{naming.GROUP}/")}},
        spec=AdapterMergeSpec(trigger=MergeTrigger.SCHEDULED, reason="the nightly CronJob fired"),
    ).wire()


class JobEvents:
    def __init__(self, clients: Clients, merges: MergeReconciler) -> None:
        self.clients = clients
        self.merges = merges

    def on_job(self, job: Mapping[str, Any]) -> None:
        meta = job["metadata"]
        if meta.get("deletionTimestamp"):
            return
        if (meta.get("labels") or {}).get(naming.LABEL_COMPONENT) == builders.VERIFY_COMPONENT:
            return  # a deep check, not a merge: the learner's reconcile reads it (VerifyChecks.outcome)
        record = scheduled_run(job)
        if record is not None:
            # Labels are anyone's to write: only the learner's own CronJob's Jobs get a record.
            problem = self._not_a_scheduled_run(job)
            if problem:
                self.merges.distrust({"apiVersion": "batch/v1", "kind": "Job", "metadata": dict(meta)},
                                     "ForeignJob", problem)
                return
            self.clients.kube.create(record)  # None when it exists already: names are deterministic
        self.merges.reconcile_named(meta["namespace"], meta["name"])

    def _not_a_scheduled_run(self, job: Mapping[str, Any]) -> str:
        namespace = job["metadata"]["namespace"]
        lns, problem = self.merges.learner_of_namespace(namespace)
        if lns is None:
            return problem
        cronjob = self.clients.kube.get("CronJob", naming.CRONJOB, namespace)
        if cronjob is None or not decisions.owned_by(dict(job["metadata"]), "CronJob", cronjob["metadata"]["uid"]):
            return (f"Job {job['metadata']['name']} carries the scheduled-run labels but "
                    f"{naming.CRONJOB} did not make it")
        return ""
