"""A queue of keys for a few worker threads, with the guarantees client-go's workqueue gives:

- a key waits in the queue at most once, however often it is added;
- a key is worked on by one thread at a time; one added while it is being worked on runs again
  right after, once;
- ``add(key, delay)`` brings a key back later (a retry); a key waiting for a later time keeps only
  its earliest one, and running it for any reason cancels the wait (the run decides anew).

``work(key)`` returns None when it is done with the key, or the seconds after which to run it
again. One that raises is logged and run again after ``error_delay``.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from privatefm_operator import metrics

log = logging.getLogger("privatefm.workqueue")

Work = Callable[[str], float | None]


class WorkQueue:
    def __init__(self, work: Work, threads: int, name: str, error_delay: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.work, self.error_delay, self.clock = work, error_delay, clock
        self.cond = threading.Condition()
        self.ready: deque[str] = deque()
        self.queued: set[str] = set()     # in ``ready``
        self.running: set[str] = set()
        self.again: set[str] = set()      # added while running
        self.later: list[tuple[float, str]] = []  # (when, key); an entry whose time is not ``due[key]`` is stale
        self.due: dict[str, float] = {}
        self.stopped = False
        self.threads = [threading.Thread(target=self.worker, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        metrics.WORKQUEUE_DEPTH.labels(name).set_function(lambda: len(self.ready))

    def start(self) -> WorkQueue:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Workers end after the key each is working on; what waits is dropped."""
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def add(self, key: str, delay: float = 0.0) -> None:
        with self.cond:
            if self.stopped:
                return
            if delay <= 0:
                self._ready(key)
                return
            when = self.clock() + delay
            if key in self.due and self.due[key] <= when:
                return
            self.due[key] = when
            heapq.heappush(self.later, (when, key))
            self.cond.notify_all()  # a worker may be waiting for a later time than this

    def __len__(self) -> int:
        """Keys waiting or running."""
        with self.cond:
            return len(self.queued | self.running | set(self.due))

    # ---- with the lock held ------------------------------------------------------------------
    def _ready(self, key: str) -> None:
        if key in self.running:
            self.again.add(key)
        elif key not in self.queued:
            self.queued.add(key)
            self.ready.append(key)
            self.cond.notify()

    def _next(self) -> str | None:
        while not self.stopped:
            now = self.clock()
            while self.later and self.later[0][0] <= now:
                when, key = heapq.heappop(self.later)
                if self.due.get(key) == when:
                    del self.due[key]
                    self._ready(key)
            if self.ready:
                key = self.ready.popleft()
                self.queued.discard(key)
                self.due.pop(key, None)  # its run decides whether it comes back
                self.running.add(key)
                return key
            self.cond.wait(self.later[0][0] - now if self.later else None)
        return None

    # ---- the workers -------------------------------------------------------------------------
    def worker(self) -> None:
        while True:
            with self.cond:
                key = self._next()
            if key is None:
                return
            delay: float | None
            try:
                delay = self.work(key)
            except Exception:
                log.exception("work on %s failed; trying again in %.0f s", key, self.error_delay)
                delay = self.error_delay
            with self.cond:
                self.running.discard(key)
                if key in self.again:
                    self.again.discard(key)
                    self._ready(key)
                elif delay is not None and not self.stopped:
                    when = self.clock() + delay
                    self.due[key] = when
                    heapq.heappush(self.later, (when, key))
                    self.cond.notify_all()
