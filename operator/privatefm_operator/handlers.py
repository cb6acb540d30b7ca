"""kopf wiring only: each handler parses what kopf delivered and hands it to its reconciler.

LearnerNamespaces are reconciled on resume, on spec change, when a watch shows one of their
children drifted or deleted, and on a timer whose pass is cheap unless something is due (a full
resync, jittered, every few hours); once deleted, the deletion handler holds them until a guardian
approved and the delay passed.
AdapterMerges are looked at on resume and create; their Jobs' events drive them afterwards.
No timer watches AdapterMerges, so they carry no kopf finalizer and never block namespace deletion.
The clients and reconcilers are built once, at start-up, and kept in kopf's ``memo``.
With shards, every handler sees only this shard's learners and what lives in their namespaces.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import kopf
import urllib3
from kubernetes.client.exceptions import ApiException

from privatefm_operator import decisions, logs, metrics, naming, reconcilers
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


def _in_our_shard(body: kopf.Body, **_: Any) -> bool:
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
    if "http" in memo:  # and free the port: the operator loop may start again in this process
        memo.http.shutdown()
        memo.http.server_close()


@kopf.on.resume(*LNS, when=_our_learner)
@kopf.on.create(*LNS, when=_our_learner)
@kopf.on.update(*LNS, field="spec", when=_our_learner)
@metrics.timed("learnernamespace")
def learner_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _retrying(lambda: memo.reconcilers.learners.reconcile(parse(LearnerNamespace, body)))


@kopf.timer(*LNS, interval=SETTINGS.resync_seconds, initial_delay=SETTINGS.resync_seconds, when=_our_learner)
@metrics.timed("learnernamespace")
def learner_resync(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    _retrying(lambda: memo.reconcilers.learners.resync(parse(LearnerNamespace, body)))


def _watch_children(kind: str, group: str, version: str, plural: str) -> None:
    """A watch on one kind of the learners' children: what it shows is remembered, and a child that
    drifted from its spec or vanished has its learner reconciled at once (``reconcilers.children``)."""
    @kopf.on.event(group, version, plural, labels=OURS, id=f"children-{plural}", when=_in_our_shard)
    async def child_event(body: kopf.Body, type: str | None, memo: kopf.Memo, **_: Any) -> None:
        """Async: most events (our own applies' echoes, status updates) need a comparison and
        nothing else, so they do not take one of the workers the reconciles run in."""
        if "reconcilers" not in memo:
            return
        learners = memo.reconcilers.learners
        name = learners.children.on_event(kind, dict(body), type == "DELETED")
        if name is not None:
            log.info("drift repair", extra={"fields": {"learner": name, "kind": kind,
                                                       "object": f"{body.get('metadata', {}).get('namespace')}/"
                                                                 f"{body.get('metadata', {}).get('name')}",
                                                       "deleted": type == "DELETED"}})
            await asyncio.get_running_loop().run_in_executor(None, functools.partial(_repair, learners, name))


def _repair(learners: Any, name: str) -> None:
    try:
        learners.repair(name)
    except Exception as err:  # an event handler is not retried by kopf: the next resync will be
        if not isinstance(err, RetryLater) and not _unavailable(err):
            raise
        log.warning("drift repair of %s deferred: %s", name, err)


for _kind, (_group, _version, _plural) in WATCHED.items():
    _watch_children(_kind, _group, _version, _plural)
if SETTINGS.kueue_cluster_queue:  # the operator makes each learner's LocalQueue only then
    _watch_children("LocalQueue", "kueue.x-k8s.io", "v1beta2", "localqueues")


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
