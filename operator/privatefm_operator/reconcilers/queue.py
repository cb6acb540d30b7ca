"""The cluster-wide gate in front of merge Jobs (``queueing`` decides; this reads and remembers).

What runs is read from the API server each time (merge Jobs not suspended and not finished, in
every namespace), so Jobs started before a restart count. What waits is remembered: a run joins
when its pass reaches the gate and leaves when it starts or ends. A waiting run comes back to the
gate at least every ``RETRY_MAX`` seconds; one not seen for three times that (its AdapterMerge was
deleted, say) is dropped, so it cannot hold a place. After a restart, every open run is reconciled
again (kopf's resume), so the waiting set refills at once.

Deciding and starting happen under one lock, so two passes of this operator cannot both take the
last free slot. When a run ends, ``next_up`` names the runs that may take its place, and the merge
reconciler passes them at once rather than at their next retry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from privatefm_operator import metrics, naming
from privatefm_operator.queueing import Run, Verdict, admit, fair_order, running_merge
from privatefm_operator.reconcilers.base import Clients, labels_of
from privatefm_operator.reconcilers.children import Children

MERGE_JOBS = f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY},{naming.LABEL_COMPONENT}=merge"
RETRY_MAX = 60.0  # seconds between a waiting run's passes, at most (``retry_delay``)


def retry_delay(position: int) -> float:
    """When a waiting run looks again: the front of the queue soon, the back later. A run that ends
    also wakes the ones next up at once (``next_up``), so this is the safety net."""
    return min(10.0 + position, RETRY_MAX)


class MergeQueue:
    def __init__(self, clients: Clients, children: Children) -> None:
        self.clients = clients
        self.children = children
        self.limit = clients.settings.merge_concurrency
        self._lock = threading.Lock()
        self._waiting: dict[tuple[str, str], tuple[Run, float]] = {}  # run, last seen (monotonic)

    @property
    def limited(self) -> bool:
        return self.limit > 0

    def running(self) -> list[Run]:
        """Merge Jobs running in learner namespaces. Anyone who may create Jobs somewhere can put our
        labels on one; only Jobs in a namespace that carries the learner labels count (namespaces
        are labelled by the operator and cluster admins, never by a tenant), so nobody else's Jobs
        take the fleet's slots."""
        runs = []
        for job in self.clients.kube.list("Job", None, selector=MERGE_JOBS):
            meta = job["metadata"]
            if running_merge(job, self._namespace_labels(meta["namespace"])):
                runs.append(Run(labels_of(job).get(naming.LABEL_LEARNER, ""), meta.get("creationTimestamp", ""),
                                meta["namespace"], meta["name"]))
        return runs

    def _namespace_labels(self, namespace: str) -> dict[str, str]:
        seen = self.children.namespace(namespace) or self.clients.kube.get("Namespace", namespace)
        return labels_of(seen) if seen else {}

    @contextmanager
    def gate(self, run: Run) -> Iterator[Verdict]:
        """The verdict for ``run``; an admitted run must be started inside the ``with``."""
        with self._lock:
            self._waiting[(run.namespace, run.name)] = (run, time.monotonic())
            verdict = admit(run, self._current(), self.running(), self.limit)
            yield verdict
            if verdict.admitted:
                self._waiting.pop((run.namespace, run.name), None)

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._waiting.pop((namespace, name), None)
            metrics.MERGE_QUEUE.set(len(self._waiting))

    def next_up(self) -> list[Run]:
        """The waiting runs that would start now, in order."""
        with self._lock:
            waiting = self._current()
            if not waiting:
                return []
            going = self.running()
            return fair_order(waiting, going)[:max(self.limit - len(going), 0)]

    def _current(self) -> list[Run]:
        """The waiting runs, less those not seen for a while (the lock is held)."""
        cutoff = time.monotonic() - 3 * RETRY_MAX
        for key in [k for k, (_, seen) in self._waiting.items() if seen < cutoff]:
            del self._waiting[key]
        metrics.MERGE_QUEUE.set(len(self._waiting))
        return [run for run, _ in self._waiting.values()]
