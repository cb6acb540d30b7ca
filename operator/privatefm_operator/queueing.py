"""The merge queue's decisions (pure): which waiting runs may start under a cluster-wide limit.

A run waits at the gate once it is planned and its Job exists, suspended: the operator starts it
(un-suspends the Job) only while fewer than ``PRIVATEFM_MERGE_CONCURRENCY`` merge Jobs run in the
whole cluster. The order is fair between learners first and by arrival second: a run whose learner
has fewer runs going sorts before one whose learner has more, then older before newer (the
AdapterMerge's creationTimestamp, which the API server sets and nobody else can write), then by
namespace and name, so that every operator replica orders alike.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from privatefm_operator import decisions, naming


@dataclass(frozen=True)
class Run:
    """A merge run at the gate, or running."""

    learner: str       # the LearnerNamespace
    created: str       # the AdapterMerge's creationTimestamp (RFC 3339, UTC: sorts as text)
    namespace: str
    name: str


@dataclass(frozen=True)
class Verdict:
    admitted: bool
    position: int      # 1: the next to start when a run finishes; 0 when admitted
    waiting: int       # runs at the gate, this one included
    running: int


def fair_order(waiting: Iterable[Run], running: Iterable[Run]) -> list[Run]:
    """The waiting runs in the order they may start."""
    going = Counter(run.learner for run in running)
    return sorted(waiting, key=lambda r: (going[r.learner], r.created, r.namespace, r.name))


def admit(run: Run, waiting: Iterable[Run], running: Iterable[Run], limit: int) -> Verdict:
    """Whether ``run`` may start now. It may when it is among the first ``limit - running`` in the
    fair order; otherwise its position counts the runs that go before it."""
    running, others = list(running), [w for w in waiting if (w.namespace, w.name) != (run.namespace, run.name)]
    queue = fair_order([*others, run], running)
    index = queue.index(run)
    free = max(limit - len(running), 0)
    if index < free:
        return Verdict(True, 0, len(queue), len(running))
    return Verdict(False, index - free + 1, len(queue), len(running))


def running_merge(job: Mapping[str, Any], namespace_labels: Mapping[str, str]) -> bool:
    """Whether a Job (listed by the merge Jobs' labels) takes a slot: it runs (not suspended, not
    finished), and it is in a learner namespace, which only the operator and cluster admins label."""
    learner_namespace = (namespace_labels.get(naming.LABEL_MANAGED_BY) == naming.MANAGED_BY
                         and bool(namespace_labels.get(naming.LABEL_NS_UID)))
    spec, status = job.get("spec") or {}, dict(job.get("status") or {})
    return learner_namespace and not spec.get("suspend") and not decisions.job_finished(status)
