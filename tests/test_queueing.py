"""The merge queue's decisions (pure: no server). tests/test_operator.py runs a real storm through it."""

from __future__ import annotations

from privatefm_operator.queueing import Run, admit, fair_order, running_merge
from privatefm_operator.reconcilers.queue import RETRY_MAX, retry_delay


def run(learner: str, n: int, minute: int) -> Run:
    return Run(learner, f"2026-11-28T02:{minute:02d}:00Z", f"lns-{learner}", f"{learner}-{n}")


def test_under_the_limit_everyone_starts() -> None:
    waiting = [run("a", i, i) for i in range(3)]
    assert all(admit(r, waiting, [], limit=8).admitted for r in waiting)


def test_at_the_limit_nobody_starts_and_positions_count_from_one() -> None:
    going = [run("x", i, 0) for i in range(2)]
    waiting = [run("a", 1, 1), run("b", 1, 2), run("c", 1, 3)]
    verdicts = [admit(r, waiting, going, limit=2) for r in waiting]
    assert [v.admitted for v in verdicts] == [False] * 3
    assert [v.position for v in verdicts] == [1, 2, 3]
    assert {(v.waiting, v.running) for v in verdicts} == {(3, 2)}


def test_first_come_first_served_between_learners_with_nothing_running() -> None:
    waiting = [run("b", 1, 5), run("a", 1, 1), run("c", 1, 3)]
    assert [r.learner for r in fair_order(waiting, [])] == ["a", "c", "b"]
    assert admit(run("a", 1, 1), waiting, [], limit=1).admitted
    assert not admit(run("b", 1, 5), waiting, [], limit=1).admitted


def test_a_learner_with_a_run_going_waits_behind_learners_with_none() -> None:
    """One learner's burst of manual merges does not starve the others."""
    going = [run("a", 1, 0)]
    waiting = [run("a", 2, 1), run("a", 3, 2), run("b", 1, 10), run("c", 1, 20)]
    assert [(r.learner, r.name) for r in fair_order(waiting, going)] == [
        ("b", "b-1"), ("c", "c-1"), ("a", "a-2"), ("a", "a-3")]
    assert admit(run("b", 1, 10), waiting, going, limit=2).admitted
    assert admit(run("a", 2, 1), waiting, going, limit=2).position == 2


def test_a_storm_of_200_never_exceeds_the_limit_and_finishes_in_fair_order() -> None:
    """Simulates the gate: each step, every waiting run asks; admitted ones run for 3 steps."""
    limit, waiting = 8, [run(f"l{i % 50}", i, i % 60) for i in range(200)]
    going: dict[Run, int] = {}
    started: list[Run] = []
    while waiting or going:
        going = {r: left - 1 for r, left in going.items() if left > 1}
        for r in sorted(waiting, key=lambda r: r.name):  # the order passes happen to come in
            if admit(r, waiting, list(going), limit).admitted:
                going[r] = 3
                waiting.remove(r)
                started.append(r)
            assert len(going) <= limit
    assert len(started) == 200
    # Fair: every learner's first run starts before any learner's fourth.
    first = {r.learner: i for i, r in reversed(list(enumerate(started)))}
    counts: dict[str, int] = {}
    fourth = []
    for i, r in enumerate(started):
        counts[r.learner] = counts.get(r.learner, 0) + 1
        if counts[r.learner] == 4:
            fourth.append(i)
    assert max(first.values()) < min(fourth)


def test_the_retry_delay_grows_with_the_position_up_to_a_minute() -> None:
    assert retry_delay(1) < retry_delay(20) <= retry_delay(10_000) == RETRY_MAX == 60


LEARNER_NS = {"app.kubernetes.io/managed-by": "privatefm-operator", "privatefm.io/ns-uid": "u1"}


def test_only_running_jobs_in_learner_namespaces_take_a_slot() -> None:
    going = {"spec": {"suspend": False}, "status": {"active": 1}}
    assert running_merge(going, LEARNER_NS)
    assert not running_merge({"spec": {"suspend": True}, "status": {}}, LEARNER_NS)
    done = {"spec": {"suspend": False}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    assert not running_merge(done, LEARNER_NS)
    # A Job somebody labelled as ours in their own namespace: it cannot take the fleet's slots.
    assert not running_merge(going, {})
    assert not running_merge(going, {"app.kubernetes.io/managed-by": "privatefm-operator"})


def test_the_running_jobs_are_listed_in_every_namespace() -> None:
    """The queue counts merge Jobs cluster-wide: a namespaced kind without a namespace is listed
    across all of them (not in a namespace called "None")."""
    from privatefm_operator.kube import Kube

    kube = Kube(api=object())  # type: ignore[arg-type]  # paths only: no request is sent
    assert kube._path("Job", None) == "/apis/batch/v1/jobs"
    assert kube._path("Job", "lrn-a") == "/apis/batch/v1/namespaces/lrn-a/jobs"
