"""The real node: containerd, runc and the kubelet run the project's own images, built from its
Dockerfiles (privatefm_testing.node, privatefm_testing.images).

A pod of the merge image under the restricted profile really runs as uid 65532 with a read-only
root, no capabilities and a seccomp filter; and stopping the cluster leaves nothing on the machine.
The user's whole path on the node (helm install, learner, manual and scheduled merges, logs, the
liveness probe) is tests/test_demo.py, which runs the README's main job.

These tests need root and the packages ``scripts/setup.sh`` installs; they never skip on the local
cluster (a missing piece is an error, so a CI run cannot pass without them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from privatefm_testing.cluster import LocalCluster
from privatefm_testing.kube import Kube, wait_for
from privatefm_testing.node import BRIDGE, HostSnapshot, residue

pytestmark = [pytest.mark.cluster, pytest.mark.node]


@pytest.fixture(scope="module", autouse=True)
def local_only(request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--cluster") != "local":
        pytest.skip("the node tests start their own local control plane with a node; kind brings its own nodes")


def get(kube: Kube, *args: str) -> dict[str, Any]:
    proc = kube.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


RESTRICTED = {"runAsNonRoot": True, "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
              "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
# What the container finds out about itself, written as its termination message.
PROBE = """
import json, os
facts = {"uid": os.getuid(), "gid": os.getgid()}
try:
    open("/opt/privatefm/written", "w")
    facts["root_writable"] = True
except OSError as err:
    facts["root_writable"] = False
    facts["root_error"] = err.strerror
status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
facts["cap_eff"] = status["CapEff"].strip()
facts["seccomp"] = status["Seccomp"].strip()
facts["no_new_privs"] = status["NoNewPrivs"].strip()
import importlib.util
facts["modules"] = {m: importlib.util.find_spec(m) is not None for m in
                    ("torch", "kopf", "kubernetes", "peft", "transformers", "privatefm_merge", "privatefm_operator",
                     "privatefm_testing")}
if facts["modules"]["torch"]:
    import torch
    facts["torch"] = torch.__version__
print("probe", json.dumps(facts), flush=True)
open("/dev/termination-log", "w").write(json.dumps(facts))
"""


def run_probe(kube: Kube, name: str, image: str) -> dict[str, Any]:
    """Runs PROBE in ``image`` as a restricted pod (admitted by PodSecurity "restricted") and returns
    what it found, from the termination message the real kubelet reported."""
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "probe"},
           "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                    "securityContext": {"runAsUser": 65532, "runAsGroup": 65532},
                    "containers": [{"name": "probe", "image": image, "imagePullPolicy": "Never",
                                    "command": ["python", "-c", PROBE], "securityContext": RESTRICTED,
                                    "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}],
                    "volumes": [{"name": "tmp", "emptyDir": {}}]}}
    kube.kubectl("apply", "-f", "-", input=json.dumps(pod))
    done = wait_for(lambda: (p := get(kube, "pod", name, "-n", "probe"))
                    and p["status"].get("phase") in ("Succeeded", "Failed") and p, 120, f"the {name} probe to finish")
    (container,) = done["status"]["containerStatuses"]
    terminated = container["state"]["terminated"]
    assert done["status"]["phase"] == "Succeeded", terminated
    return dict(json.loads(terminated["message"]))


def test_node_runs_restricted_pods_of_both_images_and_down_leaves_nothing(tmp_path: Path) -> None:
    before = HostSnapshot.take()
    cluster = LocalCluster(tmp_path / "cluster", node=True)
    state = cluster.start()
    try:
        assert state.node is not None
        kube = Kube(kubeconfig=Path(state.kubeconfig), workdir=tmp_path)
        kube.kubectl("create", "namespace", "probe")
        kube.kubectl("label", "namespace", "probe", "pod-security.kubernetes.io/enforce=restricted")
        images = state.node["images"]
        facts = {name: run_probe(kube, name, images[name]) for name in ("merge", "operator")}
        for image, found in facts.items():
            assert (found["uid"], found["gid"]) == (65532, 65532), image
            assert found["root_writable"] is False and found["root_error"] == "Read-only file system", image
            assert int(found["cap_eff"], 16) == 0, image
            assert found["seccomp"] == "2" and found["no_new_privs"] == "1", image  # seccomp filter mode
        # What each image holds: the engine and torch, or the operator without torch; never the harness.
        assert facts["merge"]["modules"] == {"torch": True, "kopf": False, "kubernetes": False, "peft": False,
                                             "transformers": False, "privatefm_merge": True,
                                             "privatefm_operator": True, "privatefm_testing": False}
        assert facts["merge"]["torch"].startswith("2.")
        assert facts["operator"]["modules"] == {"torch": False, "kopf": True, "kubernetes": True, "peft": False,
                                                "transformers": False, "privatefm_merge": True,
                                                "privatefm_operator": True, "privatefm_testing": False}
        logs = kube.kubectl("logs", "-n", "probe", "merge").stdout
        assert "\nprobe {" in "\n" + logs, logs

        # While the node runs, the residue check sees it: the check is not empty by construction.
        running = residue(before, cluster.dir / "node")
        assert any(item.startswith("process") for item in running), running
        assert f"bridge {BRIDGE}" in running and any(item.startswith("mount ") for item in running), running
    finally:
        left = cluster.stop()
    assert left == []
    assert residue(before, cluster.dir / "node") == []
    after = HostSnapshot.take()
    assert (after.paths, after.sysctls, after.chains, after.bridge, after.netns, after.cgroups) == (
        before.paths, before.sysctls, before.chains, before.bridge, before.netns, before.cgroups)
