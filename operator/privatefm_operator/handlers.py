"""kopf wiring, and the watches that are not kopf's.

LearnerNamespaces are not kopf's (``controller``: one watch, a queue and a few threads, and no
per-learner state in kopf): a learner gets a pass at start-up, on a spec change, when one of the
operator's annotations changes, and when a watch shows one of its children drifted or deleted
(plain watches, ``informers``); a cheap timer pass (one scheduling thread, ``resyncs``) whose
pass does little unless something is due (a full resync, jittered, every few hours); once
deleted, the deletion reconciler holds it until a guardian approved and the delay passed.
AdapterMerges are kopf's: looked at on resume and create; their Jobs' events drive them afterwards.
No timer watches AdapterMerges, so they carry no kopf finalizer and never block namespace deletion.
The clients and reconcilers are built once, at start-up, and kept in kopf's ``memo``.
With shards, every handler sees only this shard's learners and what lives in their namespaces.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import kopf

from privatefm_operator import decisions, informers, metrics, naming, reconcilers, resyncs
from privatefm_operator.api import GROUP, VERSION, AdapterMerge, LearnerNamespace, MergeTrigger
from privatefm_operator.controller import UNAVAILABLE_DELAY, LearnerController, unavailable
from privatefm_operator.reconcilers.base import RetryLater, parse
from privatefm_operator.reconcilers.children import WATCHED
from privatefm_operator.settings import Settings

SETTINGS = Settings()  # read at import: the timer's interval is fixed when the handlers register
SHARD = SETTINGS.shard(socket.gethostname())  # the learners this process acts on (``sharding``)
AM = (GROUP, VERSION, "adaptermerges")
OURS = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY}
OUR_CRDS = frozenset({f"learnernamespaces.{GROUP}", f"adaptermerges.{GROUP}"})
LIVENESS_URL = f"http://127.0.0.1:{SETTINGS.liveness_port}/healthz"  # kopf's own, on loopback only
RESTART = threading.Event()  # set: kopf stops, and __main__ starts it afresh
log = logging.getLogger("privatefm.operator")


def _in_our_shard(body: kopf.Body | dict[str, Any], **_: Any) -> bool:
    """Filter for what lives in (or is) a learner namespace: that learner is this shard's."""
    meta = body.get("metadata", {})
    return SHARD.owns_namespace(meta.get("namespace") or meta.get("name", ""))


def _retrying(call: Callable[[], None]) -> None:
    try:
        call()
    except RetryLater as err:
        raise kopf.TemporaryError(str(err), delay=err.delay) from err
    except Exception as err:
        if unavailable(err):
            raise kopf.TemporaryError(f"the API server is unavailable: {err}", delay=UNAVAILABLE_DELAY) from err
        raise


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.execution.max_workers = SETTINGS.workers
    memo.reconcilers = reconcilers.build(SETTINGS)
    memo.resyncs = resyncs.Resyncs(SETTINGS.resync_seconds,
                                   functools.partial(learner_resync, memo.reconcilers.learners)).start()
    _watch(memo)
    # Shared by every object's memo (kopf gives each object a shallow copy of this one, and a
    # re-created CRD is a new object): the uid each of our CRDs had when first seen.
    memo.crd_uids = {}
    metrics.init_labels(t.value for t in MergeTrigger)
    memo.http = metrics.start_http_server(SETTINGS.http_port, ready=lambda: "reconcilers" in memo,
                                          alive=lambda: metrics.kopf_liveness(LIVENESS_URL))


@kopf.on.probe(id="reconcilers")
def reconcilers_built(memo: kopf.Memo, **_: Any) -> bool:
    """kopf runs probe handlers in its own event loop when its liveness endpoint is asked: an answer
    at all proves the loop runs; an exception here turns /healthz into a 503."""
    if "reconcilers" not in memo:
        raise RuntimeError("the reconcilers are not built")
    if RESTART.is_set():
        raise RuntimeError("the operator loop is restarting")
    return True


@kopf.on.cleanup()
def cleanup(memo: kopf.Memo, **_: Any) -> None:
    if "resyncs" in memo:
        memo.resyncs.stop()
    if "informers" in memo:
        for group in memo.informers:
            group.stop()
        memo.controller.stop()
    if "http" in memo:  # and free the port: the operator loop may start again in this process
        memo.http.shutdown()
        memo.http.server_close()


@metrics.timed("learnernamespace")
def learner_resync(learners: Any, body: dict[str, Any]) -> float | None:
    """A learner's timer pass (``resyncs``); returns how soon the next one is due when the pass
    could not finish (None: one interval)."""
    try:
        learners.resync(parse(LearnerNamespace, body))
    except RetryLater as err:
        return err.delay
    except Exception as err:
        if unavailable(err):
            log.warning("timer pass of %s deferred: the API server is unavailable: %s", body["metadata"]["name"], err)
            return UNAVAILABLE_DELAY
        raise
    return None


def _child_event(learners: Any, controller: LearnerController, kind: str, body: dict[str, Any],
                 deleted: bool) -> None:
    """One event of a watch on the learners' children: what it shows is remembered, and a child
    that drifted from its spec or vanished has its learner reconciled at once
    (``reconcilers.children``), in the learners' worker threads, never in the watch's own."""
    if not _in_our_shard(body):
        return
    meta = body["metadata"]
    name = learners.children.on_event(kind, body, deleted)
    if name is not None:
        log.info("drift repair", extra={"fields": {"learner": name, "kind": kind, "deleted": deleted,
                                                   "object": f"{meta.get('namespace')}/{meta['name']}"}})
        controller.repair(name)


def _watch(memo: kopf.Memo) -> None:
    """The LearnerNamespaces' watch and queue (``controller``), and the children's watches."""
    built = memo.reconcilers
    memo.controller = LearnerController(built.learners, built.deletions, SHARD.owns_learner, SETTINGS.workers,
                                        memo.resyncs).start()
    kinds = [*WATCHED, *(["LocalQueue"] if SETTINGS.kueue_cluster_queue else [])]  # LocalQueues only with Kueue
    children = built.learners.children
    on_child = functools.partial(_child_event, built.learners, memo.controller)
    # Every Namespace, not only the operator's: a new learner's name is known free or taken without a GET.
    namespaces = informers.Informers(built.kube, ["Namespace"], "", on_child, children.known)
    children.namespaces_listed = namespaces.informers[0].synced
    memo.informers = [
        informers.Informers(built.kube, ["LearnerNamespace"], "", memo.controller.on_event,
                            memo.controller.known).start(),
        namespaces.start(),
        informers.Informers(built.kube, kinds, f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY}", on_child,
                            children.known).start()]


@kopf.on.resume(*AM, when=_in_our_shard)
@kopf.on.create(*AM, when=_in_our_shard)
@metrics.timed("adaptermerge")
def merge(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _retrying(lambda: memo.reconcilers.merges.reconcile(parse(AdapterMerge, body)))


@kopf.on.event("batch", "v1", "jobs", labels=OURS, when=_in_our_shard)
@metrics.timed("job")
def job_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    if type == "DELETED":
        return
    try:
        memo.reconcilers.jobs.on_job(body)
    except Exception as err:  # an event handler is not retried by kopf: the learner's sweep will be
        if not isinstance(err, RetryLater) and not unavailable(err):
            raise
        log.warning("job event deferred: %s", err)


@kopf.on.event("apiextensions.k8s.io", "v1", "customresourcedefinitions",
               when=lambda name, **_: name in OUR_CRDS)
def crd_event(name: str, body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    if type == "DELETED" or "reconcilers" not in memo:
        return
    conditions = body.get("status", {}).get("conditions") or []
    established = any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)
    seen = memo.crd_uids
    if decisions.crd_reinstalled(seen, name, body["metadata"]["uid"], established):
        memo.reconcilers.kube.wait_until_discoverable(f"/apis/{GROUP}/{VERSION}", body["spec"]["names"]["plural"])
        log.warning("CRD %s was re-created: restarting the operator loop so that it is served again", name)
        RESTART.set()
