"""The README's main-job command, end to end, on the real node: ``helm install`` (the operator is the
chart's StatefulSet), the sample learner, a manual merge and a scheduled merge from the CronJob as
real merge pods, verified checkpoints, and ``kubectl logs`` of a merge pod. Then everything stops
and nothing is left on the machine.

The quick lane (``--pods=process``: the operator and the merge pods as local processes) runs too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from privatefm_testing.cluster import ClusterState, LocalCluster
from privatefm_testing.kube import Kube, wait_for
from privatefm_testing.node import HostSnapshot, residue

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
SYSTEM, RELEASE = "privatefm-system", "privatefm-operator"


@pytest.fixture(autouse=True)
def local_only(request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--cluster") != "local":
        pytest.skip("the main job starts its own local control plane")


def demo(directory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # scripts/demo.sh is setup.sh (already done by the test command) followed by exactly this.
    return subprocess.run([sys.executable, "-m", "privatefm_testing.demo", "--dir", str(directory), *args],
                          capture_output=True, text=True, timeout=1500)


def rows(stdout: str) -> list[list[str]]:
    """The rows of `kubectl get lns,am -A`: [name, learner, phase, checkpoint, lag, age] for a
    learner, [namespace, name, trigger, phase, version, reason, age] for a merge."""
    table = stdout.split("==> kubectl get lns,am -A", 1)[1].split("currentCheckpoint:", 1)[0]
    return [cells for line in table.splitlines() if len(cells := line.split()) > 3 and cells[0] != "NAME"
            and cells[0] != "NAMESPACE"]


def row(table: list[list[str]], name: str) -> list[str]:
    return next(cells for cells in table if any(c.endswith(f"/{name}") for c in cells[:2]))


def get(kube: Kube, *args: str) -> dict[str, Any]:
    return dict(json.loads(kube.kubectl("get", *args, "-o", "json").stdout))


@pytest.mark.node
def test_main_job_on_the_node_merges_as_real_pods_and_leaves_nothing(tmp_path: Path) -> None:
    before = HostSnapshot.take()
    directory = tmp_path / "demo"
    proc = demo(directory, "--leave-running")
    try:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        table = rows(proc.stdout)
        assert row(table, "learner-bo")[1:5] == ["bo", "Ready", "2", "0"]
        assert row(table, "manual-1")[2:6] == ["Manual", "Succeeded", "1", "Verified"]
        (scheduled,) = [r for r in table if r[2] == "Scheduled"]
        assert scheduled[3:6] == ["Succeeded", "2", "Verified"]
        assert "sha256-verified" in proc.stdout

        state = ClusterState.load(directory)
        assert state.node is not None
        kube = Kube(kubeconfig=Path(state.kubeconfig), workdir=tmp_path)

        # The operator is the chart's StatefulSet: a real pod of the operator image, Ready by its probes.
        statefulset = get(kube, "statefulset", RELEASE, "-n", SYSTEM)
        assert statefulset["status"].get("readyReplicas") == 1, statefulset["status"]
        (pod,) = get(kube, "pods", "-n", SYSTEM, "-l", "app.kubernetes.io/name=privatefm-operator")["items"]
        (container,) = pod["spec"]["containers"]
        assert container["image"] == state.node["images"]["operator"]
        assert (container["livenessProbe"]["httpGet"]["path"], container["readinessProbe"]["httpGet"]["path"]) == (
            "/healthz", "/readyz")
        (status,) = pod["status"]["containerStatuses"]
        assert status["ready"] is True and status["restartCount"] == 0
        assert pod["spec"]["nodeName"] == state.node["name"]

        # The merge ran as a real pod of the merge image, restricted, as uid 65532; its logs show progress.
        namespace = get(kube, "lns", "learner-bo")["status"]["namespace"]
        (merge_pod,) = get(kube, "pods", "-n", namespace, "-l", "job-name=manual-1")["items"]
        spec = merge_pod["spec"]
        assert spec["nodeName"] == state.node["name"]
        assert spec["containers"][0]["image"] == state.node["images"]["merge"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
        assert merge_pod["status"]["phase"] == "Succeeded"
        result = json.loads(merge_pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"])
        assert result["status"] == "Succeeded"  # the termination message, as the real kubelet reported it
        logs = kube.kubectl("logs", "-n", namespace, merge_pod["metadata"]["name"]).stdout
        events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
        started = next(e for e in events if e.get("msg") == "pod_started")
        assert (started["uid"], started["gid"], started["version"]) == (65532, 65532, 1)
        progress = [e["msg"] for e in events if e["msg"] in ("planned", "shard_written", "merge_succeeded")]
        assert progress[0] == "planned" and "shard_written" in progress and progress[-1] == "merge_succeeded"
        assert '"msg": "shard_written"' in proc.stdout  # the demo showed the same logs

        # A stuck operator (its event loop frozen: SIGSTOP to the container's process) stops answering
        # /healthz; the kubelet's liveness probe restarts it, and it comes back Ready.
        container_id = status["containerID"].removeprefix("containerd://")
        node = LocalCluster(directory, node=True).node
        assert node is not None
        tasks = node.ctr("tasks", "ls").stdout.splitlines()
        (pid,) = [line.split()[1] for line in tasks if line.startswith(container_id)]
        os.kill(int(pid), signal.SIGSTOP)

        def restarted() -> bool:
            (now,) = get(kube, "pods", "-n", SYSTEM, "-l", "app.kubernetes.io/name=privatefm-operator")["items"]
            (cs,) = now["status"]["containerStatuses"]
            return bool(cs["restartCount"] >= 1 and cs["ready"])

        wait_for(restarted, 120, "the liveness probe to restart the frozen operator and the new one to be Ready")
        events = get(kube, "events", "-n", SYSTEM, "--field-selector", f"involvedObject.name={pod['metadata']['name']}")
        assert any(e["reason"] == "Unhealthy" and "Liveness probe failed" in e["message"] for e in events["items"])
    finally:
        left = LocalCluster(directory).stop()
    assert left == []
    assert residue(before, directory / "node") == []


def test_main_job_quick_lane_ends_with_verified_v1(tmp_path: Path) -> None:
    proc = demo(tmp_path / "demo", "--pods=process")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = rows(proc.stdout)
    assert row(table, "learner-bo")[1:5] == ["bo", "Ready", "1", "0"]
    assert row(table, "manual-1")[2:6] == ["Manual", "Succeeded", "1", "Verified"]
    assert "sha256-verified" in proc.stdout
    assert not list((tmp_path / "demo").glob("cluster.json")), "the demo must stop what it started"
