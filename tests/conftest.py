"""Session-wide real control plane and S3 server, with per-test isolation.

``--cluster=local`` (default) starts etcd, kube-apiserver, kube-controller-manager and
MinIO on loopback from the pinned builds. ``--cluster=kind`` uses pytest-kind and skips
with a reason where no Docker engine answers. Tests that only need pure functions use
neither fixture and need no server.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from privatefm_testing import seed
from privatefm_testing.cluster import LocalCluster, S3Info, pid_alive
from privatefm_testing.kube import Kube, token_kubeconfig
from privatefm_testing.nodehooks import NodeHookRunner
from privatefm_testing.operator_proc import OperatorProcess
from privatefm_testing.podrunner import Hooks, PodRunner

REPO = Path(__file__).resolve().parents[1]
OPERATOR_SA = ("privatefm-system", "privatefm-operator")
GUARDIAN = "parent-of-bo"  # the guardian of manifests/samples/learnernamespace-minimal.yaml
GUARDIAN_GROUP = "school-admins"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cluster", choices=["local", "kind"], default="local",
                     help="where the Kubernetes tests run: a local control plane (default) or kind")
    parser.addoption("--pods", choices=["process", "node"], default="process",
                     help="who runs the merge pods of the session's operator: the pod runner, as local "
                          "processes (default, the quick lane), or a real node (containerd, runc, kubelet) "
                          "in the merge image built from Dockerfile.merge")


def node_lane(config: pytest.Config) -> bool:
    return bool(config.getoption("--pods") == "node")


def _docker_engine_reason() -> str | None:
    if shutil.which("docker") is None:
        return "kind needs Docker: no docker client on PATH"
    proc = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        return f"kind needs a Docker engine; `docker info` failed: {proc.stderr.strip().splitlines()[-1:]}"
    return None


@pytest.fixture(scope="session")
def local_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    if request.config.getoption("--cluster") != "local":
        pytest.skip("this test needs the local control plane (--cluster=local)")
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), node=node_lane(request.config))
    cluster.start()
    try:
        yield cluster
    finally:
        pids = cluster.pids
        cluster.stop()
        leftovers = [p for p in pids if pid_alive(p)]
        assert not leftovers, f"cluster processes left running: {leftovers}"


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    workdir = tmp_path_factory.mktemp("kube")
    if request.config.getoption("--cluster") == "kind":
        reason = _docker_engine_reason()
        if reason:
            pytest.skip(reason)
        from pytest_kind import KindCluster  # type: ignore[import-untyped]

        kind = KindCluster("privatefm-test")
        kind.create()
        try:
            yield Kube(kubeconfig=Path(kind.kubeconfig_path), workdir=workdir)
        finally:
            kind.delete()
        return
    cluster: LocalCluster = request.getfixturevalue("local_cluster")
    assert cluster.state is not None
    yield Kube(kubeconfig=Path(cluster.state.kubeconfig), workdir=workdir, local=cluster)


@pytest.fixture(scope="session")
def s3(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Info]:
    """The real S3 server (MinIO) with the test bucket and its identities; beside a kind cluster it runs alone."""
    if request.config.getoption("--cluster") == "local":
        cluster: LocalCluster = request.getfixturevalue("local_cluster")
        assert cluster.state is not None
        yield cluster.state.s3
        return
    server = LocalCluster(tmp_path_factory.mktemp("s3"), kubernetes=False)
    state = server.start()
    try:
        yield state.s3
    finally:
        server.stop()


@pytest.fixture
def uid() -> str:
    """A short unique suffix for names, so tests never collide."""
    return secrets.token_hex(3)


@pytest.fixture
def s3_prefix(uid: str) -> str:
    return f"tests/{uid}"


@pytest.fixture
def namespace(kube: Kube, uid: str) -> Iterator[str]:
    name = f"t-{uid}"
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


# ---- the operator, run as its own ServiceAccount, and the pod runner (one each per session) -------


@pytest.fixture(scope="session")
def operator_kubeconfig(kube: Kube) -> Path:
    """The operator's own identity: a ServiceAccount token bound only by manifests/rbac.yaml."""
    kube.kubectl("apply", "-k", str(REPO / "crds"))
    # Another module may have just uninstalled (the namespace is still terminating).
    kube.kubectl("wait", "--for=delete", "namespace/privatefm-system", "--timeout=90s", check=False)
    kube.kubectl("apply", "-f", str(REPO / "manifests" / "namespace.yaml"))
    kube.kubectl("apply", "-f", str(REPO / "manifests" / "rbac.yaml"))
    kube.kubectl("apply", "-f", str(REPO / "manifests" / "admission.yaml"))  # the operator runs confined
    kube.wait_established("learnernamespaces.privatefm.io", "adaptermerges.privatefm.io")
    # The shipped guardian role (patch LearnerNamespaces; the guardian-approval policy admits only the
    # approval), bound to the sample learners' guardian and to a group of guardians.
    kube.kubectl("apply", "-f", str(REPO / "manifests" / "people-roles.yaml"))
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
               "metadata": {"name": "test-guardians"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                           "name": "privatefm-guardian"},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": GUARDIAN},
                            {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": GUARDIAN_GROUP}]}
    kube.kubectl("apply", "-f", "-", input=json.dumps(binding))
    token = kube.kubectl("create", "token", OPERATOR_SA[1], "-n", OPERATOR_SA[0], "--duration=6h").stdout.strip()
    return token_kubeconfig(kube.kubeconfig, token, kube.workdir / "operator.kubeconfig")


@pytest.fixture(scope="session")
def base_model(s3: S3Info) -> str:
    return seed.publish_base(s3.publisher.client(retries=3), s3.bucket, version=1)  # the publisher's job


@pytest.fixture(scope="session")
def hooks() -> Hooks:
    return Hooks()


@pytest.fixture(scope="session")
def podrunner(request: pytest.FixtureRequest, kube: Kube, hooks: Hooks,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[PodRunner | NodeHookRunner]:
    """Quick lane: the pod runner runs merge pods as local processes. Node lane: the kubelet runs
    them, and the hooks run while the operator is frozen (privatefm_testing.nodehooks)."""
    runner: PodRunner | NodeHookRunner
    if node_lane(request.config):
        runner = NodeHookRunner(kube.api_client(), hooks).start()
    else:
        runner = PodRunner(kube.api_client(), tmp_path_factory.mktemp("pods"), after_exit=hooks).start()
    yield runner
    runner.stop()


@pytest.fixture(scope="session")
def operator(request: pytest.FixtureRequest, kube: Kube, s3: S3Info, operator_kubeconfig: Path, base_model: str,
             podrunner: PodRunner | NodeHookRunner,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    lane: dict[str, str] = {"merge_image": "privatefm/merge:test"}
    if node_lane(request.config):
        cluster: LocalCluster = request.getfixturevalue("local_cluster")
        assert cluster.state is not None and cluster.state.node is not None
        # The real merge image, never pulled; small pods, since this machine has two cores.
        lane = {"merge_image": cluster.state.node["images"]["merge"], "merge_image_pull_policy": "Never",
                "merge_cpu": "250m", "merge_memory": "2Gi"}
    proc = OperatorProcess(operator_kubeconfig, s3, tmp_path_factory.mktemp("operator") / "operator.log",
                           merge_gpus="0", resync_seconds="2", store_timeout_seconds="1", store_grace_seconds="8",
                           integrity_check_seconds="10", fallback_backoff_seconds="5",
                           merge_pending_timeout_seconds="8", full_resync_seconds="10", **lane)
    if isinstance(podrunner, NodeHookRunner):
        podrunner.operator_pid = lambda: proc.proc.pid if proc.proc and proc.proc.poll() is None else None
    proc.start()
    yield proc
    proc.stop()
    print(proc.log_tail(80))
