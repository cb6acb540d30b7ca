"""The user's path on a real node: containerd, runc and the kubelet run the project's own images,
built from its Dockerfiles (privatefm_testing.node, privatefm_testing.images).

1. ``privatefm-cluster``'s node runs a pod of the merge image under the restricted profile: uid
   65532, a read-only root, no capabilities, seccomp; and ``down`` leaves nothing on the machine.
2. ``helm install`` of the chart: the operator is the chart's Deployment, a real pod that passes
   its probes; a LearnerNamespace; a manual merge and a scheduled one from the CronJob, each a real
   merge pod; verified checkpoints; ``kubectl logs`` of a merge pod shows its progress.

These tests need root and the packages ``scripts/setup.sh`` installs; they never skip on the local
cluster (a missing piece is an error, so a CI run cannot pass without them).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from privatefm_testing import seed
from privatefm_testing.cluster import BIN, LocalCluster, S3Info
from privatefm_testing.kube import Kube, wait_for
from privatefm_testing.node import BRIDGE, HostSnapshot, residue

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "privatefm-operator"
MANIFESTS = REPO / "manifests"
GUARDIAN = "parent-of-bo"
SYSTEM, RELEASE = "privatefm-system", "privatefm-operator"

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
import torch
facts["torch"] = torch.__version__
print("probe", json.dumps(facts), flush=True)
open("/dev/termination-log", "w").write(json.dumps(facts))
"""


def test_node_runs_a_restricted_merge_image_pod_and_down_leaves_nothing(tmp_path: Path) -> None:
    before = HostSnapshot.take()
    cluster = LocalCluster(tmp_path / "cluster", node=True)
    state = cluster.start()
    try:
        assert state.node is not None
        kube = Kube(kubeconfig=Path(state.kubeconfig), workdir=tmp_path)
        kube.kubectl("create", "namespace", "probe")
        kube.kubectl("label", "namespace", "probe", "pod-security.kubernetes.io/enforce=restricted")
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", "namespace": "probe"},
               "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                        "securityContext": {"runAsUser": 65532, "runAsGroup": 65532},
                        "containers": [{"name": "probe", "image": state.node["images"]["merge"],
                                        "imagePullPolicy": "Never", "command": ["python", "-c", PROBE],
                                        "securityContext": RESTRICTED,
                                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}],
                        "volumes": [{"name": "tmp", "emptyDir": {}}]}}
        kube.kubectl("apply", "-f", "-", input=json.dumps(pod))  # admitted by PodSecurity "restricted"
        done = wait_for(lambda: (p := get(kube, "pod", "probe", "-n", "probe"))
                        and p["status"].get("phase") in ("Succeeded", "Failed") and p, 120, "the probe pod to finish")
        (container,) = done["status"]["containerStatuses"]
        terminated = container["state"]["terminated"]
        assert done["status"]["phase"] == "Succeeded", terminated
        facts = json.loads(terminated["message"])  # written by the real kubelet from /dev/termination-log
        assert (facts["uid"], facts["gid"]) == (65532, 65532)
        assert facts["root_writable"] is False and facts["root_error"] == "Read-only file system"
        assert int(facts["cap_eff"], 16) == 0
        assert facts["seccomp"] == "2" and facts["no_new_privs"] == "1"  # seccomp filter mode
        assert facts["torch"].startswith("2.")
        logs = kube.kubectl("logs", "-n", "probe", "probe").stdout
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


# ---- the chart, a learner and its merges, on the node --------------------------------------------
@pytest.fixture(scope="module")
def node_kube(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Kube, LocalCluster]]:
    before = HostSnapshot.take()
    cluster = LocalCluster(tmp_path_factory.mktemp("node-cluster"), node=True)
    state = cluster.start()
    try:
        kube = Kube(kubeconfig=Path(state.kubeconfig), workdir=tmp_path_factory.mktemp("node-kube"), local=cluster)
        yield kube, cluster
    finally:
        left = cluster.stop()
        assert left == [] and residue(before, cluster.dir / "node") == []


def helm(kube: Kube, *args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(BIN / "helm"), "--kubeconfig", str(kube.kubeconfig), *map(str, args)],
                          capture_output=True, text=True, env=kube.env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def installed(node_kube: tuple[Kube, LocalCluster], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``helm install`` as a platform team would: CRDs from the chart, store keys in an existing
    Secret, the local images with ``pullPolicy: Never``. The node runs no kube-proxy, so the
    operator's pod is pointed at the API server's address with ``extraEnv``."""
    kube, cluster = node_kube
    state = cluster.state
    assert state is not None and state.node is not None
    images = state.node["images"]
    s3: S3Info = state.s3
    seed.publish_base(s3.publisher.client(retries=3), s3.bucket, version=1)
    kube.kubectl("create", "namespace", SYSTEM)
    kube.kubectl("label", "namespace", SYSTEM, "pod-security.kubernetes.io/enforce=restricted")
    kube.kubectl("-n", SYSTEM, "create", "secret", "generic", "store-keys",
                 f"--from-literal=accessKey={s3.operator.access_key}",
                 f"--from-literal=secretKey={s3.operator.secret_key}")
    host, port = state.server.removeprefix("https://").rsplit(":", 1)
    repo, tag = images["operator"].rsplit(":", 1)
    merge_repo, merge_tag = images["merge"].rsplit(":", 1)
    values = {
        "image": {"repository": repo, "tag": tag, "pullPolicy": "Never"},
        "mergeImage": {"repository": merge_repo, "tag": merge_tag, "pullPolicy": "Never"},
        "s3": {"endpoint": s3.endpoint, "bucket": s3.bucket, "existingSecret": "store-keys"},
        "merge": {"gpus": 0},
        "resyncSeconds": 2,
        "extraEnv": [{"name": "KUBERNETES_SERVICE_HOST", "value": host},
                     {"name": "KUBERNETES_SERVICE_PORT", "value": port}],
    }
    values_file = tmp_path_factory.mktemp("values") / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    helm(kube, "install", RELEASE, CHART, "--namespace", SYSTEM, "-f", values_file, "--wait", "--timeout", "240s")
    kube.kubectl("apply", "-f", str(MANIFESTS / "people-roles.yaml"))
    return {"kube": kube, "s3": s3, "images": images}


def test_chart_runs_the_operator_as_a_ready_deployment(installed: dict[str, Any]) -> None:
    kube: Kube = installed["kube"]
    deployment = get(kube, "deployment", RELEASE, "-n", SYSTEM)
    assert deployment["status"].get("readyReplicas") == 1, deployment["status"]
    (pod,) = get(kube, "pods", "-n", SYSTEM, "-l", "app.kubernetes.io/name=privatefm-operator")["items"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == installed["images"]["operator"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (status,) = pod["status"]["containerStatuses"]
    assert status["ready"] is True and status["restartCount"] == 0
    assert pod["spec"]["securityContext"].get("runAsNonRoot") is True


def test_learner_merges_run_as_real_pods_in_the_merge_image(installed: dict[str, Any]) -> None:
    kube: Kube = installed["kube"]
    s3: S3Info = installed["s3"]
    body = yaml.safe_load((MANIFESTS / "samples" / "learnernamespace-minimal.yaml").read_text())
    body["spec"]["deletionDelay"] = "2s"
    name = body["metadata"]["name"]
    kube.kubectl("apply", "-f", "-", input=json.dumps(body))
    kube.kubectl("wait", "--for=condition=Ready", f"lns/{name}", "--timeout=120s")
    status = get(kube, "lns", name)["status"]
    ns = status["namespace"]
    seed.publish_adapter(s3.client(), s3.bucket, status["nsUid"], 1, seed=1)

    # A manual merge: a real pod of the merge image, under the namespace's restricted profile.
    merge = yaml.safe_load((MANIFESTS / "samples" / "adaptermerge.yaml").read_text())
    kube.kubectl("-n", ns, "create", "-f", "-", input=json.dumps(merge))
    am = merge["metadata"]["name"]
    kube.kubectl("-n", ns, "wait", "--for=jsonpath={.status.phase}=Succeeded", f"am/{am}", "--timeout=300s")
    assert get(kube, "lns", name)["status"]["currentCheckpoint"]["version"] == 1
    (pod,) = get(kube, "pods", "-n", ns, "-l", f"job-name={am}")["items"]
    assert pod["spec"]["nodeName"] == installed["kube"].local.state.node["name"]
    assert pod["spec"]["containers"][0]["image"] == installed["images"]["merge"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    events = [json.loads(line) for line in kube.kubectl("logs", "-n", ns, pod["metadata"]["name"]).stdout.splitlines()
              if line.startswith("{")]
    started = next(e for e in events if e.get("event") == "pod_started")
    assert (started["uid"], started["gid"]) == (65532, 65532)
    assert any(e.get("event") == "shard_written" for e in events)
    assert any(e.get("event") == "merge_succeeded" for e in events)

    # A scheduled merge: the CronJob fires, the operator pairs its Job with an AdapterMerge.
    kube.kubectl("patch", "lns", name, "--type=merge", "-p", json.dumps({"spec": {"merge": {"schedule": "* * * * *"}}}))

    def scheduled() -> list[dict[str, Any]]:
        items = get(kube, "am", "-n", ns)["items"]
        return [a for a in items if a["spec"].get("trigger") == "Scheduled"
                and a.get("status", {}).get("phase") == "Succeeded"]

    (run,) = wait_for(scheduled, 180, "a scheduled AdapterMerge to succeed", interval=2)[:1]
    assert run["status"]["version"] == 2
    checkpoint = get(kube, "lns", name)["status"]["currentCheckpoint"]
    assert checkpoint["version"] == 2
    # The checkpoint is verified: its manifest hashes match the bytes in the store.
    from privatefm_merge.verify import verify_checkpoint

    report = verify_checkpoint(checkpoint["uri"], s3_client=s3.root.client(retries=3))
    assert report.ok, report.message
