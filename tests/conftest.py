"""Session-wide real control plane and S3 server, with per-test isolation.

``--cluster=local`` (default) starts etcd, kube-apiserver, kube-controller-manager and
MinIO on loopback from the pinned builds. ``--cluster=kind`` uses pytest-kind and skips
with a reason where no Docker engine answers. Tests that only need pure functions use
neither fixture and need no server.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from privatefm_testing.cluster import LocalCluster, S3Info, pid_alive
from privatefm_testing.kube import Kube

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cluster", choices=["local", "kind"], default="local",
                     help="where the Kubernetes tests run: a local control plane (default) or kind")


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
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"))
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
