"""Each learner's timer pass, from one scheduling thread instead of a kopf timer per learner.

A kopf timer keeps, for every object, a task and the whole body as last seen (managedFields and
all) for as long as the object exists. Here a learner costs one compressed snapshot of what its
pass reads (metadata without managedFields, spec, status) and one entry in a heap of due times.

- The LearnerNamespace watch hands every body it sees to ``see`` (the snapshot is replaced; the
  schedule is not), and ``drop`` ends a learner's passes.
- A learner's first pass comes between half an interval and one interval after it was first seen,
  at a point fixed by its name (``first_delay``), so that an operator that starts with 10,000
  learners spreads their passes over the interval instead of running them all at once.
- A pass runs in a small pool of threads. The next pass of a learner is scheduled only when its
  pass ended, one interval later, or sooner when the pass asked for it (``RetryLater``'s delay, or
  a few seconds when the API server was away). A pass that failed otherwise is logged, counted in
  the reconcile error metric, and tried again one interval later.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("privatefm.resyncs")

KOPF_ANNOTATION_PREFIX = "kopf.zalando.org/"  # kopf's own bookkeeping: no pass reads it


def first_delay(name: str, interval: float) -> float:
    """Seconds from first sight to a learner's first pass: in [interval / 2, interval), by name."""
    fraction = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    return interval * (0.5 + fraction / 2)


def snapshot(body: dict[str, Any]) -> bytes:
    """What a pass reads of a LearnerNamespace, compressed."""
    meta = body["metadata"]
    kept = {k: v for k, v in meta.items() if k != "managedFields"}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if not k.startswith(KOPF_ANNOTATION_PREFIX)}
    if annotations:
        kept["annotations"] = annotations
    else:
        kept.pop("annotations", None)
    status = {k: v for k, v in (body.get("status") or {}).items() if k != "kopf"}
    slim = {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": kept,
            "spec": body.get("spec") or {}, "status": status}
    return zlib.compress(json.dumps(slim, separators=(",", ":")).encode())


def restore(packed: bytes) -> dict[str, Any]:
    return dict(json.loads(zlib.decompress(packed)))


Pass = Callable[[dict[str, Any]], float | None]  # the learner's body -> seconds to the next pass (None: an interval)


class Resyncs:
    def __init__(self, interval: float, run: Pass, threads: int = 4,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval, self.run, self.clock = interval, run, clock
        self.lock = threading.Condition()
        self.bodies: dict[str, bytes] = {}
        self.heap: list[tuple[float, str]] = []
        self.running: set[str] = set()
        self.stopped = False
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="resync")
        self.thread = threading.Thread(target=self.loop, name="resyncs", daemon=True)

    # ---- what the watch hands over -----------------------------------------------------------
    def see(self, body: dict[str, Any], packed: bytes | None = None) -> None:
        """``packed``: the body's ``snapshot``, when the caller made it already."""
        name, packed = body["metadata"]["name"], packed or snapshot(body)
        with self.lock:
            first = name not in self.bodies
            self.bodies[name] = packed
            if first and name not in self.running:
                heapq.heappush(self.heap, (self.clock() + first_delay(name, self.interval), name))
                self.lock.notify()

    def drop(self, name: str) -> None:
        with self.lock:
            self.bodies.pop(name, None)  # its heap entry is skipped when it comes up

    def __len__(self) -> int:
        with self.lock:
            return len(self.bodies)

    # ---- scheduling --------------------------------------------------------------------------
    def due(self) -> list[str]:
        """Takes every learner whose pass is due off the heap (each at most once)."""
        now, names = self.clock(), []
        while self.heap and self.heap[0][0] <= now:
            _, name = heapq.heappop(self.heap)
            if name in self.bodies and name not in self.running:
                self.running.add(name)
                names.append(name)
        return names

    def loop(self) -> None:
        with self.lock:
            while not self.stopped:
                for name in self.due():
                    self.pool.submit(self.one, name)
                wait = self.heap[0][0] - self.clock() if self.heap else None
                self.lock.wait(timeout=None if wait is None else max(wait, 0.0))

    def one(self, name: str) -> None:
        delay: float | None = None
        try:
            with self.lock:
                packed = self.bodies.get(name)
            if packed is not None:
                delay = self.run(restore(packed))
        except Exception:
            log.exception("timer pass of %s failed; the next one is in %.0f s", name, self.interval)
        finally:
            with self.lock:
                self.running.discard(name)
                if name in self.bodies and not self.stopped:
                    heapq.heappush(self.heap, (self.clock() + (self.interval if delay is None else delay), name))
                    self.lock.notify()

    def start(self) -> Resyncs:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify()
        self.pool.shutdown(wait=False, cancel_futures=True)
