"""The learners' timer (``privatefm_operator.resyncs``), with no server: when passes fall, what a
learner's snapshot keeps, and how a pass's outcome sets the next one."""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

from privatefm_operator import resyncs


def body(name: str, **extra: Any) -> dict[str, Any]:
    return {"apiVersion": "privatefm.io/v1alpha1", "kind": "LearnerNamespace",
            "metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": "7", "generation": 2,
                         "finalizers": ["privatefm.io/guardian"],
                         "annotations": {"kopf.zalando.org/last-handled-configuration": "{...}",
                                         "privatefm.io/deletion-approved-by": "g"},
                         "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}] * 20},
            "spec": {"learnerId": name}, "status": {"namespace": f"lrn-{name}", "kopf": {"progress": {}}}, **extra}


def test_first_passes_spread_over_the_second_half_of_the_interval_by_name() -> None:
    delays = [resyncs.first_delay(f"learner-{i}", 300.0) for i in range(2000)]
    assert all(150.0 <= d < 300.0 for d in delays)
    assert resyncs.first_delay("learner-1", 300.0) == resyncs.first_delay("learner-1", 300.0)
    assert abs(statistics.mean(delays) - 225.0) < 5  # uniform over [150, 300)
    assert min(delays) < 152 and max(delays) > 298


def test_the_snapshot_keeps_what_a_pass_reads_and_nothing_of_kopf_or_managed_fields() -> None:
    full = body("ada")
    packed = resyncs.snapshot(full)
    slim = resyncs.restore(packed)
    assert "managedFields" not in slim["metadata"]
    assert slim["metadata"]["annotations"] == {"privatefm.io/deletion-approved-by": "g"}
    assert slim["status"] == {"namespace": "lrn-ada"}
    assert slim["spec"] == full["spec"]
    for key in ("name", "uid", "resourceVersion", "generation", "finalizers"):
        assert slim["metadata"][key] == full["metadata"][key]
    assert len(packed) < 400


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_pass_sets_the_next_one_and_a_dropped_learner_has_none() -> None:
    clock, ran = Clock(), []
    outcome: dict[str, Any] = {}

    def run(b: dict[str, Any]) -> float | None:
        name = b["metadata"]["name"]
        ran.append(name)
        if isinstance(outcome.get(name), Exception):
            raise outcome[name]
        return outcome.get(name)

    timer = resyncs.Resyncs(100.0, run, clock=clock)
    for name in ("a", "b", "c"):
        timer.see(body(name))
    timer.see(body("a"))  # a later body replaces the snapshot, not the schedule
    assert len(timer) == 3 and len(timer.heap) == 3
    assert timer.due() == []
    clock.now += 100.0  # every first pass falls within one interval
    due = sorted(timer.due())
    assert due == ["a", "b", "c"]
    assert timer.due() == [], "a learner whose pass runs is not handed out again"
    outcome.update(a=5.0, b=RuntimeError("a bug"))
    timer.drop("c")
    for name in due:
        timer.one(name)
    assert ran == ["a", "b"], "a dropped learner's pass does not run"
    clock.now += 5.0
    assert timer.due() == ["a"], "RetryLater's delay"
    outcome["a"] = None
    timer.one("a")
    clock.now += 95.0
    assert timer.due() == ["b"], "a failed pass: one interval later"
    assert len(timer) == 2


def test_the_thread_runs_every_learner_every_interval_until_stopped() -> None:
    counts: dict[str, int] = {}
    lock = threading.Lock()

    def run(b: dict[str, Any]) -> None:
        with lock:
            counts[b["metadata"]["name"]] = counts.get(b["metadata"]["name"], 0) + 1

    timer = resyncs.Resyncs(0.2, run).start()
    for i in range(20):
        timer.see(body(f"l{i}"))
    time.sleep(1.1)
    timer.stop()
    with lock:
        seen = dict(counts)
    assert set(seen) == {f"l{i}" for i in range(20)}
    assert all(4 <= n <= 7 for n in seen.values()), seen  # first pass by 0.2 s, then every 0.2 s
    time.sleep(0.5)
    assert counts == seen, "no pass after stop"
