"""kopf wiring only: each handler parses what kopf delivered and hands it to its reconciler.

LearnerNamespaces are reconciled on resume, on spec change, when a watch shows one of their
children drifted or deleted (plain watches, ``informers``, not kopf's: kopf would keep state for
every child), and on a timer (one scheduling thread, ``resyncs``, not a kopf timer per learner)
whose pass is cheap unless something is due (a full resync, jittered, every few hours); once
deleted, the deletion handler holds them until a guardian approved and the delay passed.
AdapterMerges are looked at on resume and create; their Jobs' events drive them afterwards.
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
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
import urllib3
from kubernetes.client.exceptions import ApiException

from privatefm_operator import decisions, informers, logs, metrics, naming, reconcilers, resyncs
from privatefm_operator.api import GROUP, VERSION, AdapterMerge, LearnerNamespace, MergeTrigger
from privatefm_operator.reconcilers.base import RetryLater, parse
from privatefm_operator.reconcilers.children import WATCHED
from privatefm_operator.settings import Settings

SETTINGS = Settings()  # read at import: the timer's interval is fixed when the handlers register
SHARD = SETTINGS.shard(socket.gethostname())  # the learners this process acts on (``sharding``)
LNS = (GROUP, VERSION, "learnernamespaces")
AM = (GROUP, VERSION, "adaptermerges")
OURS = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY}
OUR_CRDS = frozenset({f"learnernamespaces.{GROUP}", f"adaptermerges.{GROUP}"})
LIVENESS_URL = f"http://127.0.0.1:{SETTINGS.liveness_port}/healthz"  # kopf's own, on loopback only
RESTART = threading.Event()  # set: kopf stops, and __main__ starts it afresh
log = logging.getLogger("privatefm.operator")


def _our_learner(spec: kopf.Spec, **_: Any) -> bool:
    """kopf filter: the learner is this shard's. Other shards' learners are invisible here: no
    handler, no state, no finalizer (each shard has its own, ``Shard.finalizer``)."""
    return SHARD.owns_learner(str(spec.get("learnerId", "")))


def _in_our_shard(body: kopf.Body | dict[str, Any], **_: Any) -> bool:
    """kopf filter for what lives in (or is) a learner namespace: that learner is this shard's."""
    meta = body.get("metadata", {})
    return SHARD.owns_namespace(meta.get("namespace") or meta.get("name", ""))


UNAVAILABLE_DELAY = 5.0  # seconds: the API server (or etcd behind it) is away, restarting or overloaded


def _unavailable(err: BaseException) -> bool:
    """The API server cannot be reached or cannot answer right now: worth a quick retry, unlike a
    refusal or a bug (kopf's own retry of those waits a minute)."""
    if isinstance(err, ApiException):
        return err.status in (429, 500, 502, 503, 504)
    return isinstance(err, urllib3.exceptions.HTTPError)


def _retrying(call: Callable[[], None]) -> None:
    try:
        call()
    except RetryLater as err:
        raise kopf.TemporaryError(str(err), delay=err.delay) from err
    except Exception as err:
        if _unavailable(err):
            raise kopf.TemporaryError(f"the API server is unavailable: {err}", delay=UNAVAILABLE_DELAY) from err
        raise


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.finalizer = SHARD.finalizer
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.execution.max_workers = SETTINGS.workers
    memo.reconcilers = reconcilers.build(SETTINGS, SHARD)
    memo.resyncs = resyncs.Resyncs(SETTINGS.resync_seconds,
                                   functools.partial(learner_resync, memo.reconcilers.learners)).start()
    _watch_children(memo)
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
        memo.informers.stop()
        memo.repairs.pool.shutdown(wait=False, cancel_futures=True)
    if "http" in memo:  # and free the port: the operator loop may start again in this process
        memo.http.shutdown()
        memo.http.server_close()


@kopf.on.resume(*LNS, when=_our_learner)
@kopf.on.create(*LNS, when=_our_learner)
@kopf.on.update(*LNS, field="spec", when=_our_learner)
@metrics.timed("learnernamespace")
def learner_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _retrying(lambda: memo.reconcilers.learners.reconcile(parse(LearnerNamespace, body)))


@kopf.on.event(*LNS, when=_our_learner)
async def learner_seen(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
    """Every LearnerNamespace body the watch delivers goes to its timer (``resyncs``), which keeps a
    compressed copy of what a pass reads; a deleted or deleting one has no more passes."""
    if "resyncs" not in memo:
        return
    if type == "DELETED" or body.get("metadata", {}).get("deletionTimestamp"):
        memo.resyncs.drop(body["metadata"]["name"])
    else:
        memo.resyncs.see(dict(body))


@metrics.timed("learnernamespace")
def learner_resync(learners: Any, body: dict[str, Any]) -> float | None:
    """A learner's timer pass (``resyncs``); returns how soon the next one is due when the pass
    could not finish (None: one interval)."""
    try:
        learners.resync(parse(LearnerNamespace, body))
    except RetryLater as err:
        return err.delay
    except Exception as err:
        if _unavailable(err):
            log.warning("timer pass of %s deferred: the API server is unavailable: %s", body["metadata"]["name"], err)
            return UNAVAILABLE_DELAY
        raise
    return None


def _child_event(learners: Any, repairs: Repairs, kind: str, body: dict[str, Any], deleted: bool) -> None:
    """One event of a watch on the learners' children (``informers``): what it shows is remembered,
    and a child that drifted from its spec or vanished has its learner reconciled at once
    (``reconcilers.children``), in the repair threads, never in the watch's own."""
    if not _in_our_shard(body):
        return
    meta = body["metadata"]
    name = learners.children.on_event(kind, body, deleted)
    if name is not None:
        log.info("drift repair", extra={"fields": {"learner": name, "kind": kind, "deleted": deleted,
                                                   "object": f"{meta.get('namespace')}/{meta['name']}"}})
        repairs.submit(name)


class Repairs:
    """Drift repairs, a few at a time, each learner at most once in the queue (a repair that starts
    takes it off, so drift seen during a repair queues another)."""

    def __init__(self, learners: Any, threads: int = 4) -> None:
        self.learners = learners
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="repair")
        self.lock = threading.Lock()
        self.pending: set[str] = set()

    def submit(self, name: str) -> None:
        with self.lock:
            if name in self.pending:
                return
            self.pending.add(name)
        self.pool.submit(self.run, name)

    def run(self, name: str) -> None:
        with self.lock:
            self.pending.discard(name)
        try:
            self.learners.repair(name)
        except Exception as err:  # not retried here: the learner's next timer pass will be
            level = logging.WARNING if isinstance(err, RetryLater) or _unavailable(err) else logging.ERROR
            log.log(level, "drift repair of %s deferred: %s", name, err, exc_info=level == logging.ERROR)


def _watch_children(memo: kopf.Memo) -> None:
    learners = memo.reconcilers.learners
    repairs = Repairs(learners)
    kinds = [*WATCHED, *(["LocalQueue"] if SETTINGS.kueue_cluster_queue else [])]  # LocalQueues only with Kueue
    memo.repairs = repairs
    memo.informers = informers.Informers(
        memo.reconcilers.kube, kinds, f"{naming.LABEL_MANAGED_BY}={naming.MANAGED_BY}",
        functools.partial(_child_event, learners, repairs), learners.children.known).start()


@kopf.on.delete(*LNS, when=_our_learner)
def learner_deleting(name: str, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Runs until the guardian finalizer is released; kopf calls it again after each delay."""
    def go() -> None:
        delay = memo.reconcilers.deletions.reconcile(parse(LearnerNamespace, body))
        if delay is not None:
            raise RetryLater(f"{logs.HELD}: see status.deletion", delay=delay)
        memo.reconcilers.learners.forget(name)
    _retrying(go)


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
        if not isinstance(err, RetryLater) and not _unavailable(err):
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
