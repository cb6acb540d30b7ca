"""Health that cannot lie, end to end: every status a learner and its merges go through, recorded by
a watch from the moment each object is created, reads the same to Argo CD (manifests/argocd/health.lua)
and to kstatus; an unschedulable merge pod shows Pending with the scheduler's reason, never Running,
and turns Stalled after the pending timeout (8 s in the session operator).

The pod runner stands in for kube-scheduler here: it leaves a pod whose nodeSelector its one Node
does not match Pending and writes the scheduler's own PodScheduled=False/Unschedulable condition.

With PRIVATEFM_CAPTURE_STATUSES=tests/data/statuses the recorded statuses are written there, one
file per case, for tests/test_gitops_health.py."""

from __future__ import annotations

import copy
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException
from privatefm_testing import kstatus
from privatefm_testing.cluster import S3Info
from privatefm_testing.gitops import EXPECTED, KSTATUS_OF, lua_health, minimal
from privatefm_testing.kube import Kube, wait_for
from privatefm_testing.operator_proc import OperatorProcess
from test_operator import LearnerHandle, get, new_learner

pytestmark = pytest.mark.cluster
CAPTURE = os.environ.get("PRIVATEFM_CAPTURE_STATUSES")
NO_GPU_NODE = {"privatefm.io/gpu": "h100"}  # a label the local node does not carry


@pytest.fixture(scope="module", autouse=True)
def local_pods_only(request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--cluster") != "local":
        pytest.skip("needs the local pod runner (it stands in for the scheduler)")


class Recorder:
    """Every version of every LearnerNamespace and AdapterMerge, as a watch delivers them."""

    def __init__(self, kube: Kube) -> None:
        self.api = client.CustomObjectsApi(kube.api_client())
        self.seen: list[dict[str, Any]] = []
        self._stop = threading.Event()
        # Listed now, watched from there: every change after this moment arrives, creations included.
        self._threads = [threading.Thread(target=self._watch, args=(plural, self._listed(plural)), daemon=True)
                         for plural in ("learnernamespaces", "adaptermerges")]
        self._lock = threading.Lock()

    def __enter__(self) -> Recorder:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)

    def _listed(self, plural: str) -> str:
        listed = self.api.list_cluster_custom_object("privatefm.io", "v1alpha1", plural)
        return str(listed["metadata"]["resourceVersion"])

    def _watch(self, plural: str, version: str | None) -> None:
        while not self._stop.is_set():
            try:
                for event in watch.Watch().stream(self.api.list_cluster_custom_object, "privatefm.io", "v1alpha1",
                                                  plural, resource_version=version, timeout_seconds=2):
                    obj = event["object"]
                    version = obj["metadata"]["resourceVersion"]
                    with self._lock:
                        self.seen.append(copy.deepcopy(obj))
                    if self._stop.is_set():
                        return
            except ApiException as err:
                if err.status == 410:
                    version = None

    def history(self, kind: str, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return [o for o in self.seen if o["kind"] == kind and o["metadata"]["name"] == name]

    def first(self, kind: str, name: str, predicate: Callable[[dict[str, Any]], Any]) -> dict[str, Any] | None:
        return next((o for o in self.history(kind, name) if predicate(o.get("status") or {})), None)


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def true(status: dict[str, Any], type_: str) -> bool:
    return cond(status, type_).get("status") == "True"


@pytest.fixture
def recorder(kube: Kube) -> Iterator[Recorder]:
    with Recorder(kube) as rec:
        yield rec


def test_statuses_read_the_same_to_argo_cd_and_kstatus_through_a_learner_life(
        kube: Kube, s3: S3Info, operator: OperatorProcess, uid: str, recorder: Recorder) -> None:
    cases: dict[str, dict[str, Any] | None] = {}
    a = new_learner(kube, s3, f"health-{uid}", f"h{uid}")
    b: LearnerHandle | None = None
    try:
        a.publish_adapter(1)
        a.request_merge("m1")
        assert a.wait_merge("m1")["status"]["phase"] == "Succeeded"
        a.request_merge("bad", adapterSeq=99)
        assert a.wait_merge("bad")["status"]["reason"] == "NoAdapter"

        # ---- an unschedulable merge pod: Pending with the scheduler's reason, then Stalled -----------
        b = new_learner(kube, s3, f"nogpu-{uid}", f"g{uid}", merge={"gpus": 0, "nodeSelector": NO_GPU_NODE})
        b.publish_adapter(1)
        b.request_merge("unsched")
        pending = wait_for(lambda: (s := b.merge("unsched").get("status") or {}).get("reason") == "Unschedulable"
                           and s, 60, "the merge to show the scheduler's reason")
        assert pending["phase"] == "Pending" and true(pending, "Reconciling") and not true(pending, "Stalled")
        assert "didn't match Pod's node affinity/selector" in pending["message"]
        assert "didn't match Pod's node affinity/selector" in cond(pending, "Reconciling")["message"]
        def stalled_status() -> dict[str, Any] | None:
            assert b is not None
            status = b.merge("unsched").get("status") or {}
            return status if true(status, "Stalled") else None
        stalled = wait_for(stalled_status, 60, "the unschedulable merge to turn Stalled")
        assert stalled["phase"] == "Pending" and stalled["reason"] == "Unschedulable"
        assert not true(stalled, "Reconciling") and not true(stalled, "Ready")
        assert "pending for more than 0:00:08" in cond(stalled, "Stalled")["message"]
        seen_phases = {(o.get("status") or {}).get("phase") for o in recorder.history("AdapterMerge", "unsched")}
        assert "Running" not in seen_phases, seen_phases  # it never claimed to run
        events = get(kube, "events", "-n", b.namespace, "--field-selector", "reason=MergeStalled").get("items", [])
        assert events and "Unschedulable" in events[0]["message"]

        # ---- a spec change, a fallback under way, one that gave up ------------------------------------
        kube.kubectl("patch", "lns", a.name, "--type=merge", "-p", json.dumps({"spec": {"deletionDelay": "3s"}}))
        a.wait_status(lambda s: s.get("observedGeneration") == 2 and not true(s, "Reconciling"), "generation 2")
        a.publish_adapter(2, corrupt=True)  # a cumulative adapter that never fits the base
        kube.kubectl("annotate", "--overwrite", "lns", a.name, "privatefm.io/fallback-requested=try-1")
        a.wait_status(lambda s: (s.get("recovery") or {}).get("failedAt"), "the fallback to give up", timeout=180)

        # ---- deletion, before a guardian approved ----------------------------------------------------
        kube.kubectl("delete", "lns", a.name, "--wait=false")
        a.wait_status(lambda s: s.get("phase") == "AwaitingGuardian", "the deletion to wait for a guardian")
    finally:
        a.delete()
        if b is not None:
            b.delete()

    lns, am = "LearnerNamespace", "AdapterMerge"
    history = recorder.history(lns, a.name)
    assert history and history[0]["status"] == {"observedGeneration": 0}  # the CRD's default, not "no status"
    cases["learner-no-status"] = history[0]
    cases["learner-provisioning"] = recorder.first(lns, a.name, lambda s: s.get("phase") == "Provisioning")
    cases["learner-ready"] = recorder.first(lns, a.name, lambda s: s.get("phase") == "Ready" and true(s, "Ready")
                                            and not true(s, "Reconciling"))
    cases["learner-spec-changed"] = next((o for o in history if o["metadata"].get("generation") == 2
                                          and true(o["status"], "Reconciling") and true(o["status"], "Ready")), None)
    cases["learner-recovering"] = recorder.first(lns, a.name, lambda s: s.get("phase") == "Recovering")
    cases["learner-stalled"] = recorder.first(lns, a.name,
                                              lambda s: cond(s, "Stalled").get("reason") == "FallbackFailed")
    cases["learner-deleting"] = recorder.first(lns, a.name, lambda s: s.get("phase") == "AwaitingGuardian")
    m1 = recorder.history(am, "m1")
    assert m1 and m1[0]["status"] == {"observedGeneration": 0}
    cases["merge-no-status"] = m1[0]
    cases["merge-planned"] = recorder.first(am, "m1", lambda s: s.get("reason") == "Planned")
    cases["merge-pending"] = recorder.first(am, "m1", lambda s: s.get("phase") == "Pending"
                                            and s.get("reason") not in (None, "Planned"))
    cases["merge-running"] = recorder.first(am, "m1", lambda s: s.get("phase") == "Running")
    cases["merge-succeeded"] = recorder.first(am, "m1", lambda s: s.get("phase") == "Succeeded")
    cases["merge-failed"] = recorder.first(am, "bad", lambda s: s.get("phase") == "Failed")
    cases["merge-unschedulable"] = recorder.first(am, "unsched", lambda s: s.get("reason") == "Unschedulable"
                                                  and not true(s, "Stalled"))
    cases["merge-unschedulable-stalled"] = recorder.first(am, "unsched", lambda s: true(s, "Stalled"))
    optional = {"merge-running", "merge-pending"}  # a tiny merge may finish between two looks
    missing = [name for name, obj in cases.items() if obj is None and name not in optional]
    assert not missing, missing

    for name, obj in cases.items():
        if obj is None:
            continue
        health, message = lua_health(obj)
        assert kstatus.compute(obj).status in KSTATUS_OF[health], (name, health, message)
        assert health == EXPECTED[name], (name, health, message)
    # Every version of every object seen agrees, not only the chosen ones.
    for obj in recorder.history(lns, a.name) + [o for n in ("m1", "bad", "unsched") for o in recorder.history(am, n)]:
        health, message = lua_health(obj)
        assert kstatus.compute(obj).status in KSTATUS_OF[health], (obj["metadata"]["name"], health, obj.get("status"))

    if CAPTURE:
        out = Path(CAPTURE)
        out.mkdir(parents=True, exist_ok=True)
        for name, obj in cases.items():
            if obj is not None:
                (out / f"{name}.json").write_text(json.dumps(minimal(obj), indent=2, sort_keys=True) + "\n")
