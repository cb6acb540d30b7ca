"""A fleet that does not stampede, on the real control plane and S3 server: the cluster-wide merge
queue (``PRIVATEFM_MERGE_CONCURRENCY``) under a burst of real merges, and hashed schedules as the
API server and the CronJob controller take them.

The session's operator is restarted for this module with a limit of 2 and put back afterwards.
Merge pods are real merges through the pod runner of the lane.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from privatefm_testing.cluster import S3Info
from privatefm_testing.kube import Kube, wait_for
from privatefm_testing.nodehooks import NodeHookRunner
from privatefm_testing.operator_proc import OperatorProcess
from privatefm_testing.podrunner import Hooks, PodRunner
from test_operator import LearnerHandle, get

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[1]
LIMIT = 2
MERGE_JOBS = "app.kubernetes.io/managed-by=privatefm-operator,app.kubernetes.io/component=merge"


@pytest.fixture(scope="module")
def limited_operator(operator: OperatorProcess) -> Iterator[OperatorProcess]:
    with operator.restarted(PRIVATEFM_MERGE_CONCURRENCY=str(LIMIT)) as limited:
        yield limited


def make_learner(kube: Kube, s3: S3Info, name: str, learner_id: str, schedule: str | None = None) -> LearnerHandle:
    body = yaml.safe_load((REPO / "manifests" / "samples" / "learnernamespace-minimal.yaml").read_text())
    body["metadata"]["name"] = name
    body["spec"].update(learnerId=learner_id, deletionDelay="2s")
    if schedule is not None:
        body["spec"]["merge"] = {"schedule": schedule}
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))
    kube.kubectl("wait", "--for=condition=Ready", f"lns/{name}", "--timeout=60s")
    status = get(kube, "lns", name)["status"]
    return LearnerHandle(kube, s3, name, learner_id, status["namespace"], status["nsUid"])


class JobWatch:
    """Every merge Job event in the cluster, in order: how many ran at once, and when each started."""

    def __init__(self, kube: Kube) -> None:
        from kubernetes import client, watch

        self.batch = client.BatchV1Api(kube.api_client())
        self.watch = watch.Watch()
        self.running: set[str] = set()
        self.most = 0
        self.started: list[str] = []
        self.queued_messages: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # the stream ends when the watch is stopped
            self._stream()

    def _stream(self) -> None:
        for event in self.watch.stream(self.batch.list_job_for_all_namespaces, label_selector=MERGE_JOBS,
                                       timeout_seconds=600):
            job = event["object"]
            name = f"{job.metadata.namespace}/{job.metadata.name}"
            conditions = {c.type for c in (job.status.conditions or []) if c.status == "True"}
            if event["type"] != "DELETED" and not job.spec.suspend and not conditions & {"Complete", "Failed"}:
                self.running.add(name)
                if name not in self.started:
                    self.started.append(name)
            else:
                self.running.discard(name)
            self.most = max(self.most, len(self.running))

    def __enter__(self) -> JobWatch:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.watch.stop()


def test_a_burst_of_merges_never_exceeds_the_limit_and_starts_fairly(
        kube: Kube, s3: S3Info, limited_operator: OperatorProcess, hooks: Hooks,
        podrunner: PodRunner | NodeHookRunner, uid: str) -> None:
    """Learner a asks for four merges at once; its first two run and are held there (the pod
    runner holds their pods' reports), so a3 and a4 wait. Then b and c ask for one each, and wait
    too. When a1 is let go, the free slot goes to b1, a learner with nothing running, not to a3,
    which is older (first come, first served would start a3). At most LIMIT merge Jobs ever run;
    waiting runs show Pending/Queued with their position; all six succeed."""
    if not isinstance(podrunner, PodRunner):
        pytest.skip("holding a merge pod's report needs the local pod runner (on the node a hook freezes "
                    "the operator)")
    learners = {k: make_learner(kube, s3, f"fleet-{k}-{uid}", f"f{k}{uid}") for k in "abc"}
    held = {"a1": threading.Event(), "a2": threading.Event()}

    def hold(pod: dict[str, Any], code: int) -> None:
        event = held.get(pod["metadata"]["labels"].get("batch.kubernetes.io/job-name", ""))
        if event is not None:
            event.wait(120)
    hooks.by_namespace[learners["a"].namespace] = hold

    def reason(k: str, name: str) -> str | None:
        return (learners[k].merge(name).get("status") or {}).get("reason")

    try:
        for handle in learners.values():
            handle.publish_adapter(1)
        with JobWatch(kube) as jobs:
            for n in range(1, 5):
                learners["a"].request_merge(f"a{n}")
            wait_for(lambda: reason("a", "a3") == reason("a", "a4") == "Queued", 60, "a3 and a4 to wait")
            learners["b"].request_merge("b1")
            learners["c"].request_merge("c1")
            wait_for(lambda: reason("b", "b1") == reason("c", "c1") == "Queued", 60, "b1 and c1 to wait")
            queued = learners["a"].merge("a4")["status"]
            assert queued["phase"] == "Pending" and queued["message"].startswith("position "), queued
            assert f"at most {LIMIT} merge Jobs run" in queued["message"]
            assert sorted(name.split("/")[1] for name in jobs.started) == ["a1", "a2"]
            held["a1"].set()
            wait_for(lambda: len(jobs.started) >= 3, 120, "a third run to start")
            assert jobs.started[2].split("/")[1] == "b1", jobs.started
            held["a2"].set()
            done = {f"{k}{n}": learners[k].wait_merge(f"{k}{n}", timeout=300)
                    for k, n in [("a", 1), ("a", 2), ("a", 3), ("a", 4), ("b", 1), ("c", 1)]}
        assert {name: am["status"]["phase"] for name, am in done.items()} == dict.fromkeys(done, "Succeeded")
        assert jobs.most == LIMIT, f"at most {LIMIT} merge Jobs at once, saw {jobs.most}"
        assert sorted(name.split("/")[1] for name in jobs.started) == sorted(done), jobs.started
        versions = sorted(am["status"]["targetVersion"] for name, am in done.items() if name.startswith("a"))
        assert versions == [1, 2, 3, 4]  # the queue reorders starts, never versions
    finally:
        for event in held.values():
            event.set()
        hooks.by_namespace.pop(learners["a"].namespace, None)
        for handle in learners.values():
            handle.delete()


def test_hashed_schedules_resolve_per_learner_and_the_cronjob_takes_them(
        kube: Kube, s3: S3Info, limited_operator: OperatorProcess, uid: str) -> None:
    from privatefm_operator.schedules import resolve_hashed

    schedule = "H H(1-4) * * MON-FRI"
    handles = [make_learner(kube, s3, f"hash-{i}-{uid}", f"h{i}{uid}", schedule) for i in range(3)]
    try:
        seen = set()
        for handle in handles:
            cron = get(kube, "cronjob", "nightly-merge", "-n", handle.namespace)["spec"]["schedule"]
            assert cron == resolve_hashed(schedule, handle.learner_id) == handle.status()["mergeSchedule"]
            minute, hour, *rest = cron.split()
            assert 0 <= int(minute) <= 59 and 1 <= int(hour) <= 4 and rest == ["*", "*", "MON-FRI"]
            seen.add(cron)
        assert len(seen) > 1  # three learners, one schedule text, their own times (1 in 14,400 to fail)
    finally:
        for handle in handles:
            handle.delete()


def test_with_kueue_the_operator_prepares_the_job_and_leaves_admission_to_kueue(
        kube: Kube, s3: S3Info, operator: OperatorProcess, uid: str) -> None:
    """Kueue's contract for a batch/v1 Job: a suspended Job labelled kueue.x-k8s.io/queue-name is
    Kueue's to admit, by un-suspending it. This test plays Kueue's part, exactly that un-suspension,
    to pin the contract; tests/test_kueue.py runs a real Kueue."""
    with operator.restarted(PRIVATEFM_KUEUE_QUEUE_NAME="merges", PRIVATEFM_MERGE_CONCURRENCY="1"):
        learner = make_learner(kube, s3, f"kueue-{uid}", f"k{uid}")
        try:
            learner.publish_adapter(1)
            learner.request_merge("k1")
            waiting = wait_for(lambda: (learner.merge("k1").get("status") or {}).get("reason") == "Queued"
                               and learner.merge("k1"), 60, "the run to wait for Kueue")["status"]
            assert waiting["phase"] == "Pending" and "handed to Kueue" in waiting["message"], waiting
            job = get(kube, "job", "k1", "-n", learner.namespace)
            assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "merges"
            assert job["spec"]["suspend"] is True
            params = job["spec"]["template"]["metadata"]["annotations"]
            assert params["merge.privatefm.io/target-version"] == "1", params
            assert get(kube, "secret", "privatefm-run.k1", "-n", learner.namespace)  # its credentials, ready
            time.sleep(5)  # the operator never starts it itself (not even under mergeConcurrency)
            assert get(kube, "job", "k1", "-n", learner.namespace)["spec"]["suspend"] is True
            kube.kubectl("patch", "job", "k1", "-n", learner.namespace, "--type=merge",
                         "-p", json.dumps({"spec": {"suspend": False}}))  # Kueue admits it
            assert learner.wait_merge("k1", timeout=180)["status"]["phase"] == "Succeeded"
        finally:
            learner.delete()
