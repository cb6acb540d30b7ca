"""The learners' work queue (``privatefm_operator.workqueue``): each key waits once, runs on one
thread at a time, runs once more when added during its run, and comes back after the delay its run
asked for; a wait for later keeps the earliest time and is cancelled by a run. Real threads."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

from privatefm_operator.workqueue import WorkQueue


def wait_until(what: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "not reached in time"
        time.sleep(0.005)


class Recorder:
    def __init__(self, results: dict[str, list[float | None]] | None = None, hold: float = 0.0) -> None:
        self.runs: Counter[str] = Counter()
        self.times: dict[str, list[float]] = {}
        self.results = results or {}
        self.hold = hold
        self.lock = threading.Lock()
        self.active: set[str] = set()
        self.overlaps = 0
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, key: str) -> float | None:
        with self.lock:
            if key in self.active:
                self.overlaps += 1
            self.active.add(key)
            self.runs[key] += 1
            self.times.setdefault(key, []).append(time.monotonic())
            planned = self.results.get(key) or [None]
            result = planned.pop(0) if len(planned) > 1 else planned[0]
        self.gate.wait()
        time.sleep(self.hold)
        with self.lock:
            self.active.discard(key)
        if result == -1:
            raise RuntimeError("boom")
        return result


def test_a_key_added_many_times_while_waiting_runs_once() -> None:
    work = Recorder()
    work.gate.clear()
    queue = WorkQueue(work, 2, "t").start()
    try:
        queue.add("busy")  # holds one thread at the gate
        wait_until(lambda: work.runs["busy"] == 1)
        queue.add("blocker")
        wait_until(lambda: work.runs["blocker"] == 1)
        for _ in range(10):
            queue.add("k")  # both threads are busy: k waits, once
        work.gate.set()
        wait_until(lambda: work.runs["k"] == 1)
        time.sleep(0.1)
        assert work.runs == Counter({"busy": 1, "blocker": 1, "k": 1})
    finally:
        queue.stop()


def test_a_key_added_during_its_run_runs_once_more_after_it_and_never_beside_it() -> None:
    work = Recorder()
    work.gate.clear()
    queue = WorkQueue(work, 4, "t").start()
    try:
        queue.add("k")
        wait_until(lambda: work.runs["k"] == 1)
        for _ in range(5):
            queue.add("k")  # three idle threads, yet none may take k now
        time.sleep(0.1)
        assert work.runs["k"] == 1
        work.gate.set()
        wait_until(lambda: work.runs["k"] == 2)
        time.sleep(0.1)
        assert work.runs["k"] == 2 and work.overlaps == 0
    finally:
        queue.stop()


def test_a_run_that_asks_for_a_delay_or_fails_comes_back_after_it() -> None:
    work = Recorder({"retry": [0.2, None], "boom": [-1, None]})
    queue = WorkQueue(work, 2, "t", error_delay=0.3).start()
    try:
        queue.add("retry")
        queue.add("boom")
        wait_until(lambda: work.runs["retry"] == 2 and work.runs["boom"] == 2)
        retry, boom = work.times["retry"], work.times["boom"]
        assert 0.2 <= retry[1] - retry[0] < 1.0
        assert 0.3 <= boom[1] - boom[0] < 1.0
        time.sleep(0.4)
        assert work.runs == Counter({"retry": 2, "boom": 2})  # done: not run again
    finally:
        queue.stop()


def test_a_later_wait_keeps_the_earliest_time_and_a_run_cancels_it() -> None:
    work = Recorder()
    queue = WorkQueue(work, 1, "t").start()
    try:
        started = time.monotonic()
        queue.add("k", 0.2)
        queue.add("k", 5.0)  # later than the one waiting: ignored
        wait_until(lambda: work.runs["k"] == 1)
        assert 0.2 <= work.times["k"][0] - started < 1.0
        queue.add("j", 0.3)
        queue.add("j")  # runs now, and the wait for later is gone
        wait_until(lambda: work.runs["j"] == 1)
        time.sleep(0.5)
        assert work.runs["j"] == 1 and len(queue) == 0
    finally:
        queue.stop()


def test_stop_ends_the_workers_and_drops_what_waits() -> None:
    work = Recorder()
    queue = WorkQueue(work, 2, "t").start()
    queue.add("later", 0.3)
    queue.stop()
    queue.add("after-stop")
    for thread in queue.threads:
        thread.join(2)
        assert not thread.is_alive()
    time.sleep(0.4)
    assert work.runs == Counter()


def test_the_depth_gauge_counts_keys_ready_and_waiting_for_a_worker() -> None:
    from prometheus_client import REGISTRY

    def depth() -> float | None:
        return REGISTRY.get_sample_value("privatefm_workqueue_depth", {"queue": "depth-test"})

    work = Recorder()
    work.gate.clear()
    queue = WorkQueue(work, 1, "depth-test").start()
    try:
        assert depth() == 0
        queue.add("running")
        wait_until(lambda: work.runs["running"] == 1)
        queue.add("a")
        queue.add("b")
        queue.add("a")
        queue.add("later", delay=60)
        assert depth() == 2  # a and b wait for the one worker; the running key and the later one do not count
        work.gate.set()
        wait_until(lambda: work.runs["b"] == 1)
        wait_until(lambda: depth() == 0)
    finally:
        work.gate.set()
        queue.stop()
