"""Session-wide real control plane and S3 server, with per-test isolation.

``--cluster=local`` (default) starts etcd, kube-apiserver, kube-controller-manager and
versitygw on loopback from the pinned builds. ``--cluster=kind`` uses pytest-kind and skips
with a reason where no Docker engine answers. Tests that only need pure functions use
neither fixture and need no server.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from privatefm_testing.cluster import BIN, LocalCluster, S3Info, pid_alive

REPO = Path(__file__).resolve().parents[1]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cluster", choices=["local", "kind"], default="local",
                     help="where the Kubernetes tests run: a local control plane (default) or kind")


@dataclass
class Kube:
    """A reachable cluster: admin kubeconfig plus helpers to act as other users."""

    kubeconfig: Path
    workdir: Path
    local: LocalCluster | None = None

    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": f"{BIN}:{os.environ['PATH']}"}

    def kubectl(self, *args: str, check: bool = True, input: str | None = None,
                as_user: str | None = None, as_groups: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
        cmd = [str(BIN / "kubectl"), *args]
        if as_user:
            cmd += [f"--as={as_user}", *(f"--as-group={g}" for g in as_groups)]
        proc = subprocess.run(cmd, env=self.env(), text=True, capture_output=True, input=input, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def kubeconfig_as(self, user: str, groups: tuple[str, ...] = ()) -> Path:
        """A kubeconfig that impersonates ``user`` (and ``groups``) for authorization tests."""
        config = yaml.safe_load(self.kubeconfig.read_text())
        for entry in config["users"]:
            entry["user"]["as"] = user
            if groups:
                entry["user"]["as-groups"] = list(groups)
        path = self.workdir / f"as-{user.replace(':', '_')}.kubeconfig"
        path.write_text(yaml.safe_dump(config))
        return path

    def api_client(self, as_user: str | None = None, as_groups: tuple[str, ...] = ()) -> Any:
        from kubernetes import config

        api = config.new_client_from_config(str(self.kubeconfig))
        if as_user:
            api.set_default_header("Impersonate-User", as_user)
            for group in as_groups:  # the client sends one header; enough for one group
                api.set_default_header("Impersonate-Group", group)
        return api


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
def s3(request: pytest.FixtureRequest) -> S3Info:
    """The real S3 server (versitygw) with the test bucket."""
    cluster: LocalCluster = request.getfixturevalue("local_cluster")
    assert cluster.state is not None
    return cluster.state.s3


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
