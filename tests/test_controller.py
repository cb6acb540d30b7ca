"""Which LearnerNamespace events start a pass, and what a pass does with its outcome
(``privatefm_operator.controller``), with the reconcilers replaced by recorders: no server. The
passes against the real API server are test_operator's, test_shards' and test_chaos'."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from privatefm_operator import naming
from privatefm_operator.controller import CONFLICT_DELAY, ERROR_DELAY, UNAVAILABLE_DELAY, LearnerController, Trigger
from privatefm_operator.reconcilers.base import RetryLater
from privatefm_operator.resyncs import restore


def lns(name: str, generation: int = 1, learner_id: str | None = None, annotations: dict[str, str] | None = None,
        deleting: bool = False, status: dict[str, Any] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "generation": generation, "resourceVersion": "1",
                            "annotations": annotations or {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-29T00:00:00Z"
    return {"apiVersion": "privatefm.io/v1alpha1", "kind": "LearnerNamespace", "metadata": meta,
            "spec": {"learnerId": learner_id or name, "baseModel": {"name": "tiny"},
                     "guardians": [{"kind": "User", "name": "g"}]},
            "status": status or {}}


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        assert kind == "LearnerNamespace"
        return self.objects.get(name)


class FakeLearners:
    def __init__(self) -> None:
        self.clients = type("Clients", (), {"kube": FakeKube()})()
        self.passes: list[tuple[str, int]] = []
        self.forgotten: list[str] = []
        self.raises: list[BaseException] = []
        self.lock = threading.Lock()

    def reconcile(self, lns: Any) -> None:
        with self.lock:
            self.passes.append((lns.metadata["name"], lns.metadata["generation"]))
            if self.raises:
                raise self.raises.pop(0)

    def forget(self, name: str) -> None:
        self.forgotten.append(name)


class FakeDeletions:
    def __init__(self) -> None:
        self.delays: list[float | None] = [None]
        self.passes: list[str] = []

    def reconcile(self, lns: Any) -> float | None:
        self.passes.append(lns.metadata["name"])
        return self.delays.pop(0) if len(self.delays) > 1 else self.delays[0]


class FakeResyncs:
    def __init__(self) -> None:
        self.seen: list[str] = []
        self.dropped: list[str] = []

    def see(self, body: dict[str, Any], packed: bytes | None = None) -> None:
        assert packed is not None and restore(packed)["spec"] == body["spec"]  # made once, handed on
        self.seen.append(body["metadata"]["name"])

    def drop(self, name: str) -> None:
        self.dropped.append(name)


@pytest.fixture
def parts() -> tuple[LearnerController, FakeLearners, FakeDeletions, FakeResyncs]:
    learners, deletions, resyncs = FakeLearners(), FakeDeletions(), FakeResyncs()
    return (LearnerController(learners, deletions, lambda learner_id: not learner_id.startswith("other"), 2,
                              resyncs), learners, deletions, resyncs)


def settle(controller: LearnerController) -> None:
    controller.start()
    deadline = time.monotonic() + 5
    while len(controller.queue) and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)


def test_the_trigger_is_generation_deletion_and_the_operators_own_annotations() -> None:
    base = Trigger.of(lns("a"))
    assert Trigger.of(lns("a", status={"phase": "Ready"})) == base            # a status write: no pass
    assert Trigger.of(lns("a", annotations={"example.com/x": "1"})) == base    # someone else's annotation
    assert Trigger.of(lns("a", generation=2)) != base                          # a spec change
    assert Trigger.of(lns("a", deleting=True)) != base
    approved = Trigger.of(lns("a", annotations={naming.APPROVAL_ANNOTATION: "g"}))
    assert approved != base and approved != Trigger.of(lns("a", annotations={naming.APPROVAL_ANNOTATION: "h"}))


def test_first_sight_and_spec_changes_pass_status_writes_and_other_shards_do_not(parts: Any) -> None:
    controller, learners, _, resyncs = parts
    controller.on_event("LearnerNamespace", lns("a"), False)
    controller.on_event("LearnerNamespace", lns("a", status={"phase": "Ready"}), False)  # before its pass: one pass
    controller.on_event("LearnerNamespace", lns("other-b", learner_id="other-b"), False)
    settle(controller)
    assert learners.passes == [("a", 1)]
    controller.on_event("LearnerNamespace", lns("a", status={"phase": "Ready", "observedGeneration": 1}), False)
    controller.on_event("LearnerNamespace", lns("a", annotations={"example.com/note": "x"}), False)
    time.sleep(0.1)
    assert learners.passes == [("a", 1)]
    controller.on_event("LearnerNamespace", lns("a", generation=2), False)
    controller.on_event("LearnerNamespace", lns("a", generation=2, annotations={naming.FALLBACK_ANNOTATION: "1"}),
                        False)
    time.sleep(0.2)
    assert learners.passes[1:] in ([("a", 2)], [("a", 2), ("a", 2)])  # the newest body, once or twice
    assert "other-b" not in resyncs.seen and "a" in resyncs.seen
    assert list(controller.known("LearnerNamespace")) == [("", "a")]
    controller.stop()


def test_a_deleting_learner_is_the_deletion_reconcilers_held_until_it_lets_go(parts: Any) -> None:
    controller, learners, deletions, resyncs = parts
    deletions.delays = [0.2, None]  # held once, then released
    learners.clients.kube.objects["a"] = lns("a", deleting=True)  # what the retry reads
    controller.on_event("LearnerNamespace", lns("a", deleting=True), False)
    settle(controller)
    time.sleep(0.3)
    assert deletions.passes == ["a", "a"] and learners.passes == []
    assert learners.forgotten == ["a"] and resyncs.dropped == ["a"]
    controller.on_event("LearnerNamespace", lns("a", deleting=True), True)  # DELETED
    assert "a" not in dict(controller.known("LearnerNamespace")).values()
    controller.stop()


@pytest.mark.parametrize(("error", "delay"), [
    (RetryLater("not yet", delay=7), 7),
    (ApiException(status=409), CONFLICT_DELAY),
    (ApiException(status=503), UNAVAILABLE_DELAY),
    (ApiException(status=403), ERROR_DELAY),
    (ValueError("a bug"), ERROR_DELAY),
])
def test_a_pass_that_could_not_finish_asks_for_its_retry(parts: Any, error: Exception, delay: float) -> None:
    controller, learners, _, _ = parts
    learners.raises = [error]
    learners.clients.kube.objects["a"] = lns("a")
    assert controller.run("a") == delay
    assert controller.run("a") is None  # the retry reads the learner afresh and finishes


def test_a_repair_reads_the_learner_and_one_gone_is_forgotten(parts: Any) -> None:
    controller, learners, _, _ = parts
    learners.clients.kube.objects["a"] = lns("a", generation=3)
    controller.repair("a")
    controller.repair("gone")
    settle(controller)
    assert learners.passes == [("a", 3)] and learners.forgotten == ["gone"]
    controller.stop()
