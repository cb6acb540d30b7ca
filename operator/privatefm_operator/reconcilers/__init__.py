"""One reconciler per resource: ``learner`` (LearnerNamespace), ``deletion`` (a LearnerNamespace
being deleted), ``merge`` (AdapterMerge) and ``jobs`` (the merge Jobs' events); ``verify`` runs the
deep checks' Jobs for the learner reconciler. Each reconcile is
an ordered list of phases over a scope object, ending in one status write; decisions are the pure
functions in ``decisions``."""

from __future__ import annotations

from dataclasses import dataclass

from privatefm_operator.kube import Kube
from privatefm_operator.reconcilers.base import Clients
from privatefm_operator.reconcilers.deletion import DeletionReconciler
from privatefm_operator.reconcilers.jobs import JobEvents
from privatefm_operator.reconcilers.learner import LearnerReconciler
from privatefm_operator.reconcilers.merge import MergeReconciler
from privatefm_operator.reconcilers.retention import Retention
from privatefm_operator.reconcilers.verify import VerifyChecks
from privatefm_operator.settings import Settings
from privatefm_operator.storage import Storage


@dataclass(frozen=True)
class Reconcilers:
    learners: LearnerReconciler
    merges: MergeReconciler
    jobs: JobEvents
    deletions: DeletionReconciler
    kube: Kube
    verify: VerifyChecks


def build(settings: Settings) -> Reconcilers:
    """The shared clients, made once (at operator start-up), and the reconcilers that use them."""
    clients = Clients(Kube(connections=settings.workers + 8), Storage(settings), settings)
    learners = LearnerReconciler(clients)
    merges = MergeReconciler(clients, learners)
    learners.merges = merges
    learners.verify = VerifyChecks(clients)
    learners.retention = Retention(clients)
    return Reconcilers(learners, merges, JobEvents(clients, merges), DeletionReconciler(clients, learners),
                       clients.kube, learners.verify)
