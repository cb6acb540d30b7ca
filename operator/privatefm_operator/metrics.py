"""Prometheus metrics (the seed service's five figures, by Prometheus naming rules) and the
operator's HTTP endpoints: /metrics, /healthz (liveness: kopf's own liveness endpoint, asked on
every probe) and /readyz (readiness).

The per-learner gauges carry one ``learner`` label each: one series per LearnerNamespace and gauge
(three per learner), removed when the learner is deleted (docs/operator.md, Metrics)."""

from __future__ import annotations

import contextlib
import functools
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar, cast

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

LEARNER_NAMESPACES = Gauge("privatefm_learner_namespaces", "LearnerNamespaces the operator manages")
MERGE_OPERATIONS = Counter("privatefm_merge_operations_total", "Finished merge runs",
                           ["trigger", "result"])
MERGE_DURATION = Histogram("privatefm_merge_duration_seconds", "Merge wall time reported by merge pods",
                           buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400))
CHECKPOINT_SIZE = Histogram("privatefm_checkpoint_size_bytes", "Size of verified checkpoints",
                            buckets=tuple(float(2**n) for n in range(20, 41, 2)))
FALLBACK_OPERATIONS = Counter("privatefm_fallback_operations_total",
                              "Fallbacks (re-clone and adapter replay) that finished", ["reason", "result"])
CORRUPTION_DETECTED = Counter("privatefm_corruption_detected_total",
                              "Integrity checks that found a checkpoint damaged", ["reason", "check"])
RECONCILE_DURATION = Histogram("privatefm_reconcile_duration_seconds", "Reconcile latency", ["kind"])
UNTRUSTED = Counter("privatefm_untrusted_objects_total",
                    "Objects ignored because their identity did not check out (a forged label, owner or status)",
                    ["kind", "reason"])
RECONCILE_ERRORS = Counter("privatefm_reconcile_errors_total", "Reconciles that raised", ["kind"])
CHILD_APPLIES = Counter("privatefm_child_applies_total", "Server-side applies of learners' children, by why: "
                        "unseen, changed (the spec), drifted (a watch showed it), full (the periodic resync)",
                        ["kind", "reason"])
API_REQUESTS = Counter("privatefm_api_requests_total", "Requests the operator's own client sent to the Kubernetes "
                       "API (kopf's watches of AdapterMerges, Jobs and CRDs not included), by verb, resource "
                       "and HTTP status (error: no answer)", ["verb", "resource", "code"])
DRIFT_REPAIRS = Counter("privatefm_drift_repairs_total", "Learner passes started by a watch event: a child "
                        "drifted from its spec or was deleted")
ACCEPT_BYTES_READ = Counter("privatefm_accept_bytes_read_total", "Checkpoint bytes the operator read to accept "
                            "merges (0 where the store kept SHA-256 checksums at upload)")
WORKQUEUE_DEPTH = Gauge("privatefm_workqueue_depth", "Keys ready for a worker of the named queue and waiting for "
                        "one (learner passes; a key waiting for a later time is not counted)", ["queue"])
MERGE_QUEUE = Gauge("privatefm_merge_queue_waiting", "Merge runs waiting for a slot under mergeConcurrency")
SHARD_HELD = Gauge("privatefm_shard_held", "1 while this process holds its shard's Lease and acts on its learners; "
                   "0 while it stands by", ["shard"])
CHECKPOINTS_PRUNED = Counter("privatefm_checkpoints_pruned_total", "Checkpoint versions deleted by retention")
CHECKPOINT_BYTES_PRUNED = Counter("privatefm_checkpoint_bytes_pruned_total",
                                  "Bytes of checkpoints deleted by retention")
UPLOADS_ABORTED = Counter("privatefm_incomplete_uploads_aborted_total", "Stale unfinished multipart uploads aborted "
                          "by retention")
LEARNER_LAST_SUCCESS = Gauge("privatefm_learner_last_merge_success_timestamp_seconds",
                             "When the learner's current checkpoint was verified (Unix time)", ["learner"])
LEARNER_CHECKPOINT_VERSION = Gauge("privatefm_learner_checkpoint_version",
                                   "Version of the learner's current verified checkpoint", ["learner"])
LEARNER_VERSION_LAG = Gauge("privatefm_learner_version_lag",
                            "Base versions the learner's checkpoint is behind the latest published base", ["learner"])
LEARNER_GAUGES = (LEARNER_LAST_SUCCESS, LEARNER_CHECKPOINT_VERSION, LEARNER_VERSION_LAG)
F = TypeVar("F", bound=Callable[..., Any])


def observe_learner(name: str, checkpoint_version: int | None, verified_at: float | None, lag: int | None) -> None:
    """The per-learner gauges, from the status just written. A value that is unknown has no series."""
    for gauge, value in ((LEARNER_CHECKPOINT_VERSION, checkpoint_version), (LEARNER_LAST_SUCCESS, verified_at),
                         (LEARNER_VERSION_LAG, lag)):
        if value is None:
            forget_series(gauge, name)
        else:
            gauge.labels(learner=name).set(value)


def forget_series(gauge: Gauge, name: str) -> None:
    with contextlib.suppress(KeyError):
        gauge.remove(name)


def forget_learner(name: str) -> None:
    for gauge in LEARNER_GAUGES:
        forget_series(gauge, name)


def start_http_server(port: int, ready: Callable[[], bool], alive: Callable[[], tuple[bool, bytes]],
                      host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """``alive()``: (whether the operator's loop is alive, what to say); ``ready()``: whether it serves."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif self.path == "/healthz":
                ok, body = alive()
                self._send(200 if ok else 503, body)
            elif self.path == "/readyz":
                ok = ready()
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._send(404, b"not found\n")

        def _send(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # probes are not news
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    return server


def kopf_liveness(url: str, timeout: float = 5.0) -> tuple[bool, bytes]:
    """Asks kopf's liveness endpoint: it answers only while kopf's event loop runs, and 200 only
    when every ``kopf.on.probe`` handler succeeds."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200, response.read()
    except urllib.error.HTTPError as err:
        return False, f"kopf liveness: HTTP {err.code}: {err.read()[:512]!r}\n".encode()
    except OSError as err:
        return False, f"kopf liveness endpoint does not answer: {err}\n".encode()


def init_labels(triggers: Iterable[str]) -> None:
    """Expose zero-valued series up front, so rates and alerts work before the first event."""
    for trigger in triggers:
        for result in ("succeeded", "failed"):
            MERGE_OPERATIONS.labels(trigger=trigger, result=result)


def timed(kind: str) -> Callable[[F], F]:
    """Decorator: reconcile latency and error metrics for one kind of object."""
    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                return fn(*args, **kwargs)
            except Exception:
                RECONCILE_ERRORS.labels(kind=kind).inc()
                raise
            finally:
                RECONCILE_DURATION.labels(kind=kind).observe(time.monotonic() - start)
        return cast(F, inner)
    return wrap
