"""Job events: every merge Job of ours has its AdapterMerge record, and its progress moves that run.

    on_job = record a scheduled run (a suspended CronJob Job has none yet) → reconcile its AdapterMerge
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from privatefm_operator import naming
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
        record = scheduled_run(job)
        if record is not None:
            self.clients.kube.create(record)  # None when it exists already: names are deterministic
        self.merges.reconcile_named(meta["namespace"], meta["name"])
