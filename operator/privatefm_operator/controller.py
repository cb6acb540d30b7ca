"""LearnerNamespaces, watched and worked on without kopf.

kopf keeps a memory, a worker and a queue of decoded events for every object it handles, and for
each it writes a finalizer of its own and a last-handled annotation: two writes per learner on top
of the learner's own, and most of what the operator held per learner at 1,000 learners
(docs/benchmarks.md). Here one list-and-watch (``informers``) hands every LearnerNamespace event
to ``on_event``, which keeps, per learner of this shard, only what decides whether a pass is
needed (``Trigger``), and a ``WorkQueue`` runs the passes:

- a learner seen for the first time in this process (start-up included) gets a pass;
- after that, a new generation (a spec change), a change of the operator's own annotations
  (``privatefm.io/...``: deletion approval, fallback or verify requested), or the start of a
  deletion does. A status write, the operator's own included, does not;
- a deleting learner's pass is the deletion reconciler's, which holds it until a guardian approved
  and the delay passed, and asks to run again when that may have changed;
- a pass that could not finish runs again after the delay it asked for (``RetryLater``), a few
  seconds when the API server was away, or a minute after an unexpected error;
- a child's drift (``repair``) runs a pass from a fresh read.

Each pass that ends logs one line naming the learner, so the logs say which process handled it.

The guardian finalizer is the only finalizer a learner carries (``hold``); those kopf wrote in
earlier versions are dropped by the learner's first pass. Every body seen also goes to the timer
(``resyncs``), which runs the cheap periodic pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from privatefm_operator import metrics, naming
from privatefm_operator.api import LearnerNamespace
from privatefm_operator.reconcilers.base import RetryLater, parse
from privatefm_operator.resyncs import restore, snapshot
from privatefm_operator.workqueue import WorkQueue

log = logging.getLogger("privatefm.operator")

UNAVAILABLE_DELAY = 5.0  # seconds: the API server (or etcd behind it) is away, restarting or overloaded
CONFLICT_DELAY = 0.5     # someone else wrote the learner meanwhile: read it again and go on
ERROR_DELAY = 60.0       # an error nobody expected: logged, counted, and tried again


def unavailable(err: BaseException) -> bool:
    """The API server cannot be reached or cannot answer right now: worth a quick retry, unlike a
    refusal or a bug."""
    if isinstance(err, ApiException):
        return err.status in (429, 500, 502, 503, 504)
    return isinstance(err, urllib3.exceptions.HTTPError)


@dataclass(frozen=True)
class Trigger:
    """What of a LearnerNamespace asks for a pass when it changes. Pure."""

    deleting: bool
    generation: int
    annotations: str  # a digest of the operator's own annotations

    @classmethod
    def of(cls, body: dict[str, Any]) -> Trigger:
        meta = body.get("metadata") or {}
        ours = sorted((k, v) for k, v in (meta.get("annotations") or {}).items()
                      if k.startswith(f"{naming.GROUP}/"))
        digest = hashlib.sha256(json.dumps(ours).encode()).hexdigest()[:16] if ours else ""
        return cls(bool(meta.get("deletionTimestamp")), int(meta.get("generation") or 0), digest)


class LearnerController:
    def __init__(self, learners: Any, deletions: Any, owns: Callable[[str], bool], threads: int,
                 resyncs: Any = None) -> None:
        """``learners`` and ``deletions`` are the reconcilers; ``owns(learnerId)`` says whether the
        learner is this shard's; ``resyncs`` (optional) gets every live body for the timer."""
        self.learners, self.deletions, self.owns, self.resyncs = learners, deletions, owns, resyncs
        self.lock = threading.Lock()
        self.seen: dict[str, Trigger] = {}          # this shard's learners, as last queued
        self.bodies: dict[str, bytes] = {}  # the newest body of a queued learner, as its (compressed) snapshot
        self.queue = WorkQueue(self.run, threads, "learner", error_delay=ERROR_DELAY)

    # ---- what the watch hands over -----------------------------------------------------------
    def on_event(self, kind: str, body: dict[str, Any], deleted: bool) -> None:
        meta = body["metadata"]
        name = meta["name"]
        if deleted:
            self._gone(name)
            return
        if not self.owns(str((body.get("spec") or {}).get("learnerId", ""))):
            return
        trigger, packed = Trigger.of(body), snapshot(body)
        if self.resyncs is not None:
            if trigger.deleting:
                self.resyncs.drop(name)
            else:
                self.resyncs.see(body, packed)
        with self.lock:
            changed = self.seen.get(name) != trigger
            if changed:
                self.seen[name] = trigger
            if changed or name in self.bodies:
                self.bodies[name] = packed  # a queued pass works from the newest body
        if changed:
            self.queue.add(name)

    def known(self, kind: str) -> Iterable[tuple[str, str]]:
        with self.lock:
            return [("", name) for name in self.seen]

    def repair(self, name: str) -> None:
        """A child of this learner drifted or vanished (a watch event): a pass now, from a fresh read."""
        metrics.DRIFT_REPAIRS.inc()
        self.queue.add(name)

    def _gone(self, name: str) -> None:
        with self.lock:
            self.seen.pop(name, None)
            self.bodies.pop(name, None)
        if self.resyncs is not None:
            self.resyncs.drop(name)
        self.learners.forget(name)

    # ---- the passes --------------------------------------------------------------------------
    def run(self, name: str) -> float | None:
        """One pass; the seconds until the next, or None."""
        try:
            return self._pass(name)
        except RetryLater as err:
            log.info("pass of %s deferred %.0f s: %s", name, err.delay, err)
            return err.delay
        except Exception as err:
            if isinstance(err, ApiException) and err.status == 409:
                return CONFLICT_DELAY
            if unavailable(err):
                log.warning("pass of %s deferred: the API server is unavailable: %s", name, err)
                return UNAVAILABLE_DELAY
            log.exception("pass of %s failed; trying again in %.0f s", name, ERROR_DELAY)
            return ERROR_DELAY

    @metrics.timed("learnernamespace")
    def _pass(self, name: str) -> float | None:
        with self.lock:
            packed = self.bodies.pop(name, None)
        body = None if packed is None else restore(packed)
        if body is None:
            body = self.learners.clients.kube.get("LearnerNamespace", name)
            if body is None:
                self._gone(name)
                return None
        if not self.owns(str((body.get("spec") or {}).get("learnerId", ""))):
            return None
        lns = parse(LearnerNamespace, body)
        if not lns.metadata.get("deletionTimestamp"):
            self.learners.reconcile(lns)
            log.info("learner reconciled", extra={"fields": {"learner": name,
                                                             "generation": lns.metadata.get("generation")}})
            return None
        delay = self.deletions.reconcile(lns)
        if delay is not None:
            log.info("deletion of %s is held: looking again in %.0f s (status.deletion)", name, delay)
            return float(delay)
        self.learners.forget(name)
        return None

    # ---- start and stop ----------------------------------------------------------------------
    def start(self) -> LearnerController:
        self.queue.start()
        return self

    def stop(self) -> None:
        self.queue.stop()
