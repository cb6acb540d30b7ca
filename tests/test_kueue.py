"""The Kueue integration against a real Kueue controller (``privatefm_testing.kueue``), built from
its Go module and run beside the local control plane, with the session's operator restarted with
``PRIVATEFM_KUEUE_QUEUE_NAME``. Merge pods are real merges through the pod runner.

The platform's part is played as a platform team would: a ResourceFlavor, a ClusterQueue whose
quota fits one merge pod at a time, and a LocalQueue in each learner namespace.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from privatefm_testing import kueue
from privatefm_testing.cluster import S3Info
from privatefm_testing.kube import Kube, wait_for
from privatefm_testing.operator_proc import OperatorProcess
from test_fleet import JobWatch, make_learner
from test_operator import LearnerHandle, get

pytestmark = pytest.mark.cluster
QUEUE, CLUSTER_QUEUE, FLAVOR = "merges", "privatefm-merges", "privatefm-default"
V = "kueue.x-k8s.io/v1beta2"


@pytest.fixture(scope="module")
def kueue_controller(request: pytest.FixtureRequest, kube: Kube,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[kueue.KueueController]:
    if request.config.getoption("--cluster") != "local":
        pytest.skip("merge pods run through the local pod runner")
    reason = kueue.available()
    if reason:
        pytest.skip(reason)
    controller = kueue.KueueController(kube, tmp_path_factory.mktemp("kueue"))
    try:
        controller.start()
        yield controller
    finally:
        controller.stop()
        print(controller.log_path.read_text(errors="replace")[-4000:])
        controller.uninstall()


def apply(kube: Kube, *objs: dict[str, object]) -> None:
    kube.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}))


def test_a_real_kueue_admits_the_operators_merge_jobs_one_at_a_time(
        kube: Kube, s3: S3Info, operator: OperatorProcess, kueue_controller: kueue.KueueController,
        uid: str) -> None:
    """Three learners ask for a merge at once. The operator prepares each Job (suspended, labelled
    with the LocalQueue, parameters and credentials in place) and leaves it. Kueue makes a Workload
    of each, admits them within the ClusterQueue's quota (one merge pod's cpu and memory), so never
    more than one runs, and un-suspends them; all three merges succeed, each Workload ends admitted
    and finished."""
    cpu, memory = operator.env.get("PRIVATEFM_MERGE_CPU", "2"), operator.env.get("PRIVATEFM_MERGE_MEMORY", "16Gi")
    apply(kube,
          {"apiVersion": V, "kind": "ResourceFlavor", "metadata": {"name": FLAVOR}},
          {"apiVersion": V, "kind": "ClusterQueue", "metadata": {"name": CLUSTER_QUEUE},
           "spec": {"namespaceSelector": {}, "resourceGroups": [{
               "coveredResources": ["cpu", "memory"],
               "flavors": [{"name": FLAVOR, "resources": [{"name": "cpu", "nominalQuota": cpu},
                                                          {"name": "memory", "nominalQuota": memory}]}]}]}})
    handles: list[LearnerHandle] = []
    with operator.restarted(PRIVATEFM_KUEUE_QUEUE_NAME=QUEUE):
        try:
            for k in "abc":
                handle = make_learner(kube, s3, f"kq-{k}-{uid}", f"kq{k}{uid}")
                handles.append(handle)
                apply(kube, {"apiVersion": V, "kind": "LocalQueue",
                             "metadata": {"name": QUEUE, "namespace": handle.namespace},
                             "spec": {"clusterQueue": CLUSTER_QUEUE}})
                handle.publish_adapter(1)
            with JobWatch(kube) as jobs:
                for handle in handles:
                    handle.request_merge("k1")
                for handle in handles:
                    assert handle.wait_merge("k1", timeout=240)["status"]["phase"] == "Succeeded"
            assert jobs.most == 1, f"{jobs.most} merge Jobs ran at once under a quota for one"
            assert len(jobs.started) == 3
            for handle in handles:
                job = get(kube, "job", "k1", "-n", handle.namespace)
                assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == QUEUE
                (workload,) = get(kube, "workloads.kueue.x-k8s.io", "-n", handle.namespace)["items"]
                assert workload["spec"]["queueName"] == QUEUE
                assert workload["status"]["admission"]["clusterQueue"] == CLUSTER_QUEUE
                wait_for(lambda h=handle: any(  # type: ignore[misc]
                    c["type"] == "Finished" and c["status"] == "True"
                    for c in (get(kube, "workloads.kueue.x-k8s.io", "-n", h.namespace)["items"][0]
                              .get("status", {}).get("conditions") or [])), 60, "the Workload to finish")
                assert handle.checkpoint_version() == 1
        finally:
            for handle in handles:
                handle.delete()
            for handle in handles:
                wait_for(lambda h=handle: not get(kube, "lns", h.name), 120,  # type: ignore[misc]
                         f"{handle.name} to be deleted (Kueue releases its Workload)")
            kube.kubectl("delete", "clusterqueue.kueue.x-k8s.io", CLUSTER_QUEUE, "--wait=false", check=False)
            kube.kubectl("delete", "resourceflavor.kueue.x-k8s.io", FLAVOR, "--wait=false", check=False)
