"""A real, local Kubernetes control plane and S3 server on loopback.

Starts etcd, kube-apiserver (RBAC, default admission incl. PodSecurity and
ValidatingAdmissionPolicy, service-account token signing), kube-controller-manager
(namespace, garbage-collector, job, cronjob, serviceaccount, resourcequota, ...) and
MinIO (S3 that enforces IAM and STS session policies) from the binaries ``scripts/build-tools.sh``
builds. Every process runs in its own process group and is stopped with the cluster;
the PIDs are recorded in ``<dir>/cluster.json`` so another shell can stop it too.

A chaos test may stop and start etcd, kube-apiserver or MinIO on its own (``restart``,
``stop_component``, ``start_component``): each comes back with the same flags, ports, certificates
and data, and the recorded PIDs follow it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[3]
CACHE = Path(os.environ.get("PRIVATEFM_CACHE", Path.home() / ".cache" / "privatefm"))
BIN = CACHE / "bin"

REGION = "us-east-1"
CONTROLLERS = (
    "namespace-controller",
    "garbage-collector-controller",
    "job-controller",
    "cronjob-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "resourcequota-controller",
    "ttl-after-finished-controller",
    "root-ca-certificate-publisher-controller",
)
# What a real node needs besides the kubelet and the scheduler (``privatefm_testing.node``).
NODE_CONTROLLERS = (
    "node-lifecycle-controller",
    "deployment-controller",
    "statefulset-controller",
    "replicaset-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "pod-garbage-collector-controller",
)
ADMIN_USER = "privatefm-admin"
# The components a test may stop and start again (``LocalCluster.restart``).
RESTARTABLE = ("etcd", "kube-apiserver", "minio")


def ensure_tools() -> Path:
    """Builds whatever component is missing (cached under ~/.cache) and returns the bin dir."""
    wanted = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm", "minio", "kubelet",
              "kube-scheduler", "kueue")
    if not all((BIN / name).exists() for name in wanted):
        subprocess.run(["bash", str(REPO_ROOT / "scripts" / "build-tools.sh")], check=True)
    return BIN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie has exited; it only waits for its parent to reap it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@dataclass(frozen=True)
class Credentials:
    """One identity's S3 credentials at one endpoint; ``session_token`` for temporary ones."""

    endpoint: str
    access_key: str
    secret_key: str
    session_token: str | None = None
    region: str = REGION

    def client(self, service: str = "s3", *, retries: int = 1, **config: Any) -> Any:
        """A boto3 client (S3 through the project's one factory). One attempt by default: a denial
        is the answer, and a test should see it at once. ``config`` adds botocore options."""
        if service == "s3" and not config:
            from privatefm_merge.store import make_s3_client

            return make_s3_client(self.endpoint, self.region, self.access_key, self.secret_key, self.session_token,
                                  max_attempts=retries)
        import boto3
        from botocore.config import Config

        return boto3.client(
            service, endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            aws_session_token=self.session_token,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": retries, "mode": "standard"},
                          **config),
        )

    def env(self) -> dict[str, str]:
        """The standard variables boto3 (and the merge engine) read; nothing else."""
        env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
               "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region}
        if self.session_token:
            env["AWS_SESSION_TOKEN"] = self.session_token
        return env

    def assume_role(self, policy: str | None = None, duration_seconds: int = 900, *,
                    validate: bool = True) -> Credentials:
        """STS AssumeRole as this identity; with ``policy``, the session is limited to it.
        ``validate=False`` lets botocore send what it would refuse (to ask the server)."""
        kwargs: dict[str, Any] = {"RoleArn": "arn:aws:iam::minio:role/privatefm-run",  # MinIO ignores it
                                  "RoleSessionName": "privatefm-run", "DurationSeconds": duration_seconds}
        if policy is not None:
            kwargs["Policy"] = policy
        issued = self.client("sts", parameter_validation=validate).assume_role(**kwargs)["Credentials"]
        return Credentials(self.endpoint, issued["AccessKeyId"], issued["SecretAccessKey"],
                           issued["SessionToken"], self.region)

    def admin(self) -> Any:
        """A ``minio.MinioAdmin`` acting as this identity."""
        from minio import MinioAdmin
        from minio.credentials import StaticProvider

        host = self.endpoint.removeprefix("http://")
        return MinioAdmin(endpoint=host, secure=False, region=self.region,
                          credentials=StaticProvider(self.access_key, self.secret_key, self.session_token))


@dataclass
class S3Info:
    """The S3 server (MinIO, which enforces IAM and STS session policies), its bucket and the
    identities the tests act as."""

    endpoint: str
    bucket: str
    root: Credentials       # the store's admin: sees and may do everything (the tests' god view)
    operator: Credentials   # the operator's own identity: reads base/, owns learners/ and audit/
    publisher: Credentials  # publishes base models: writes base/ and nothing else
    region: str = REGION

    def client(self) -> Any:
        """An admin client (root), with retries."""
        return self.root.client(retries=3)

    def env(self) -> dict[str, str]:
        """The standard variables boto3 (and the merge image) read, as root."""
        return self.root.env()

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> S3Info:
        return cls(endpoint=raw["endpoint"], bucket=raw["bucket"], region=raw.get("region", REGION),
                   root=Credentials(**raw["root"]), operator=Credentials(**raw["operator"]),
                   publisher=Credentials(**raw["publisher"]))


@dataclass
class ClusterState:
    """What another process needs to reach (or stop) a running cluster."""

    dir: str
    server: str
    token: str
    kubeconfig: str
    s3: S3Info
    pids: dict[str, int] = field(default_factory=dict)
    node: dict[str, Any] | None = None  # name, gateway, images (privatefm_testing.node), when one runs

    @classmethod
    def load(cls, directory: Path) -> ClusterState:
        raw = json.loads((directory / "cluster.json").read_text())
        raw["s3"] = S3Info.from_json(raw["s3"])
        return cls(**raw)

    def save(self) -> None:
        Path(self.dir, "cluster.json").write_text(json.dumps(asdict(self), indent=2))


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + MinIO on 127.0.0.1; with ``node=True``, also
    a real node (containerd, kubelet, kube-scheduler: ``privatefm_testing.node``) running the
    project's own images, and the API server and MinIO listen on the node's bridge gateway."""

    def __init__(self, directory: Path, bucket: str = "privatefm", kubernetes: bool = True,
                 node: bool = False) -> None:
        """``kubernetes=False`` starts only the S3 server (for a kind cluster, which brings its own)."""
        from privatefm_testing.node import GATEWAY, Node

        self.kubernetes = kubernetes
        self.dir = directory.resolve()
        self.node = Node(self.dir / "node", BIN, CACHE / "containerd") if node and kubernetes else None
        self.host = GATEWAY if self.node else "127.0.0.1"
        self.bucket = bucket
        self.bin = BIN
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.state: ClusterState | None = None
        # What a restart needs to bring a component back exactly as it was.
        self._etcd_ports: tuple[int, int] | None = None
        self._apiserver_port: int | None = None
        self._sa_key: Path | None = None
        self._minio: Any = None  # the MinioServer

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> ClusterState:
        ensure_tools()
        for sub in ("etcd", "pki", "logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        token, node_token = secrets.token_hex(16), secrets.token_hex(16)
        tokens = f'{token},{ADMIN_USER},admin-uid,"system:masters"\n'
        if self.node:
            tokens += f'{node_token},system:node:{self.node_name},node-uid,"system:nodes"\n'
            kubelet_client_certs(self.dir / "pki")
        (self.dir / "pki" / "tokens.csv").write_text(tokens)
        sa_key = self.dir / "pki" / "sa.key"
        if not sa_key.exists():
            subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True)
        try:
            server, kubeconfig = "", Path()
            if self.node:
                self.node.prepare()
            if self.kubernetes:
                self._start_etcd()
                server = self._start_apiserver(sa_key, timeout)
            s3 = self._start_s3(timeout)
            if self.kubernetes:
                self._wait_apiserver(server, token, timeout)
                kubeconfig = self._write_kubeconfig(server, token)
            self.state = ClusterState(dir=str(self.dir), server=server, token=token,
                                      kubeconfig=str(kubeconfig), s3=s3, pids={})
            if self.kubernetes:
                self._start_controller_manager(kubeconfig, sa_key, timeout)
            self.state.pids = {name: p.pid for name, p in self._procs.items()}
            self.state.save()  # already, so that `privatefm-cluster down` finds it if the node fails
            if self.node:
                self._start_node(server, node_token, kubeconfig, timeout)
                self.state.pids = {name: p.pid for name, p in self._procs.items()}
                self.state.save()
        except BaseException:
            self.stop()
            raise
        return self.state

    def stop(self, grace: float = 10.0) -> list[str]:
        """Stops every process this cluster started (reverse start order), then reaps them. With a
        node, puts the machine back as it was and returns whatever could not be removed."""
        pids = {name: p.pid for name, p in self._procs.items()}
        if not pids and (self.dir / "cluster.json").exists():
            pids = ClusterState.load(self.dir).pids
        left: list[str] = []
        if self.node is not None or (self.dir / "node" / "host-before.json").exists():
            from privatefm_testing.node import Node

            node = self.node or Node(self.dir / "node", BIN, CACHE / "containerd")
            left = node.stop(pids, stop_pids)
            pids = {k: v for k, v in pids.items() if k not in ("kubelet", "kube-scheduler", "containerd")}
        stop_pids(list(reversed(list(pids.values()))), grace)
        for proc in self._procs.values():
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)
        self._procs.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "cluster.json").unlink()
        if self.node is not None or (self.dir / "node" / "host-before.json").exists():
            from privatefm_testing.node import HostSnapshot, residue

            snapshot = self.dir / "node" / "host-before.json"
            left = residue(HostSnapshot.load(snapshot), self.dir / "node", list(pids.values()))
            if not left:
                snapshot.unlink()
        return left

    @property
    def node_name(self) -> str:
        return socket.gethostname()

    def _start_node(self, server: str, node_token: str, kubeconfig: Path, timeout: float) -> None:
        from privatefm_testing.images import ensure_images
        from privatefm_testing.node import GATEWAY, NodeConfig

        assert self.node is not None and self.state is not None
        pki = self.dir / "pki"
        self.node.start(NodeConfig(server=server, admin_kubeconfig=kubeconfig, node_token=node_token,
                                   kubelet_ca=pki / "kubelet-ca.crt", apiserver_ca=pki / "apiserver" / "apiserver.crt",
                                   name=self.node_name), self._spawn, timeout)
        images = ensure_images(self.node)
        self.node.wait_ready(lambda *a: subprocess.run(
            [str(self.bin / "kubectl"), "--kubeconfig", str(kubeconfig), *a],
            check=True, capture_output=True, text=True).stdout, timeout)
        self.state.node = {"name": self.node_name, "gateway": GATEWAY, "images": images}

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs.values()]

    # ---- components ------------------------------------------------------------------------
    def _spawn(self, name: str, args: Sequence[str | Path]) -> subprocess.Popen[bytes]:
        log = open(self.dir / "logs" / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [str(a) for a in args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=self.dir,
        )
        log.close()
        self._procs[name] = proc
        return proc

    def _start_etcd(self) -> None:
        client, peer = self._etcd_ports or (free_port(), free_port())
        self._etcd_ports = (client, peer)
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._spawn("etcd", [
            self.bin / "etcd", "--name", "privatefm", "--data-dir", self.dir / "etcd",
            "--listen-client-urls", self.etcd_url, "--advertise-client-urls", self.etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
            "--initial-cluster", f"privatefm=http://127.0.0.1:{peer}",
            "--log-level", "warn",
        ])

    def _start_apiserver(self, sa_key: Path, timeout: float) -> str:
        port = self._apiserver_port or free_port()
        self._apiserver_port, self._sa_key = port, sa_key
        self._spawn("kube-apiserver", [
            self.bin / "kube-apiserver",
            "--etcd-servers", self.etcd_url,
            "--bind-address", self.host, "--advertise-address", self.host,
            "--secure-port", str(port),
            "--cert-dir", self.dir / "pki" / "apiserver",
            *(self._node_apiserver_flags() if self.node else ["--authorization-mode", "RBAC"]),
            "--token-auth-file", self.dir / "pki" / "tokens.csv",
            "--service-cluster-ip-range", "10.96.0.0/16",
            "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
            "--service-account-key-file", sa_key,
            "--service-account-signing-key-file", sa_key,
            "--allow-privileged=true",
            "--enable-priority-and-fairness=false",
            "--storage-media-type", "application/json",
            "--v", "1",
        ])
        return f"https://{self.host}:{port}"

    def _node_apiserver_flags(self) -> list[str | Path]:
        """The Node authorizer and NodeRestriction confine the kubelet's token to its own node; the
        API server reaches the kubelet's API at its InternalIP with a client certificate."""
        pki = self.dir / "pki"
        return ["--authorization-mode", "Node,RBAC", "--enable-admission-plugins", "NodeRestriction",
                "--kubelet-client-certificate", pki / "apiserver-kubelet-client.crt",
                "--kubelet-client-key", pki / "apiserver-kubelet-client.key",
                "--kubelet-preferred-address-types", "InternalIP"]

    def _wait_apiserver(self, server: str, token: str, timeout: float) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        req = urllib.request.Request(f"{server}/readyz", headers={"Authorization": f"Bearer {token}"})
        self._wait("kube-apiserver", lambda: urllib.request.urlopen(req, context=ctx, timeout=2).status == 200,
                   timeout)

    def _write_kubeconfig(self, server: str, token: str) -> Path:
        path = self.dir / "admin.kubeconfig"
        # The API server signs its serving cert with its own CA, written into the cert dir at start.
        path.write_text(kubeconfig_yaml(server, token, ca_file=str(self.dir / "pki" / "apiserver" / "apiserver.crt")))
        return path

    def _start_controller_manager(self, kubeconfig: Path, sa_key: Path, timeout: float) -> None:
        port = free_port()
        self._spawn("kube-controller-manager", [
            self.bin / "kube-controller-manager",
            "--kubeconfig", kubeconfig,
            "--authentication-kubeconfig", kubeconfig,
            "--authorization-kubeconfig", kubeconfig,
            "--leader-elect=false",
            "--controllers", ",".join(CONTROLLERS + (NODE_CONTROLLERS if self.node else ())),
            "--bind-address", "127.0.0.1", "--secure-port", str(port),
            "--service-account-private-key-file", sa_key,
            "--root-ca-file", self.dir / "pki" / "apiserver" / "apiserver.crt",
            "--concurrent-cron-job-syncs", "2",
            "--v", "1",
        ])
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        url = f"https://127.0.0.1:{port}/healthz"
        self._wait("kube-controller-manager",
                   lambda: urllib.request.urlopen(url, context=ctx, timeout=2).status == 200, timeout)

    def _start_s3(self, timeout: float) -> S3Info:
        """MinIO with the bucket, and the operator's and the publisher's identities, each with the
        policy a real deployment gives it (``privatefm_operator.store_policy``)."""
        from privatefm_operator.store_policy import operator_policy, publisher_policy

        from privatefm_testing.minio import MinioServer

        server = MinioServer(self.dir / "s3", self.bucket, log=self.dir / "logs" / "minio.log", host=self.host)
        root = server.start(timeout)
        assert server.proc is not None
        self._procs["minio"] = server.proc
        self._minio = server
        return S3Info(endpoint=server.endpoint, bucket=self.bucket, root=root,
                      operator=server.add_user("privatefm-operator", operator_policy(self.bucket)),
                      publisher=server.add_user("privatefm-publisher", publisher_policy(self.bucket)))

    # ---- chaos: one component down and up again ----------------------------------------------
    def restart(self, component: str, *, hard: bool = False, timeout: float = 120.0) -> int:
        """Stops ``component`` (etcd, kube-apiserver or minio) and starts it again with the same
        flags, ports, certificates and data; returns when it (and, for etcd, the API server above it)
        answers again. ``hard``: SIGKILL, as a crash, rather than SIGTERM. Returns the new PID."""
        self.stop_component(component, hard=hard)
        return self.start_component(component, timeout=timeout)

    def restart_apiserver(self, *, hard: bool = False, timeout: float = 120.0) -> int:
        return self.restart("kube-apiserver", hard=hard, timeout=timeout)

    def restart_etcd(self, *, hard: bool = False, timeout: float = 120.0) -> int:
        return self.restart("etcd", hard=hard, timeout=timeout)

    def stop_component(self, component: str, *, hard: bool = False, grace: float = 20.0) -> None:
        """Stops one component (its whole process group) and reaps it; the cluster's record of
        PIDs drops it until ``start_component`` brings it back."""
        self._check_restartable(component)
        proc = self._procs.get(component)
        if proc is None:
            raise RuntimeError(f"{component} is not running")
        if hard:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        stop_pids([proc.pid], grace)
        proc.wait(timeout=10)
        if pid_alive(proc.pid):
            raise RuntimeError(f"{component} (pid {proc.pid}) is still running")
        del self._procs[component]
        if component == "minio" and self._minio is not None:
            self._minio.proc = None
        self._save_pids()

    def start_component(self, component: str, *, timeout: float = 120.0) -> int:
        """Starts a component that ``stop_component`` stopped, exactly as it first ran, and waits
        until it answers. Returns its PID."""
        self._check_restartable(component)
        if component in self._procs:
            raise RuntimeError(f"{component} is already running (pid {self._procs[component].pid})")
        assert self.state is not None
        try:
            if component == "etcd":
                self._start_etcd()
                self._wait("etcd", lambda: urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2).status
                           == 200, timeout)
                if "kube-apiserver" in self._procs:  # the API server reconnects by itself; wait for it
                    self._wait_apiserver(self.state.server, self.state.token, timeout)
            elif component == "kube-apiserver":
                assert self._sa_key is not None
                self._start_apiserver(self._sa_key, timeout)
                self._wait_apiserver(self.state.server, self.state.token, timeout)
            else:
                self._start_minio_again(timeout)
        finally:
            self._save_pids()  # also a component that failed to come up: stop() must find it
        return self._procs[component].pid

    def _check_restartable(self, component: str) -> None:
        if component not in RESTARTABLE:
            raise ValueError(f"{component!r}: only {', '.join(RESTARTABLE)} can be restarted")
        if component != "minio" and not self.kubernetes:
            raise ValueError(f"{component!r}: this cluster runs only the S3 server")

    def _start_minio_again(self, timeout: float) -> None:
        """MinIO on its old address, data directory and root credentials (``MinioServer.start`` picks
        new ports and makes the bucket); its users, policies and objects are in the data directory."""
        from privatefm_testing.minio import ensure_minio

        server = self._minio
        assert server is not None and server.endpoint
        root = server.root
        address = server.endpoint.removeprefix("http://")
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("MINIO_")}
        env = {**inherited, "MINIO_ROOT_USER": root.access_key, "MINIO_ROOT_PASSWORD": root.secret_key,
               "MINIO_BROWSER": "off", "MINIO_UPDATE": "off", "MINIO_REGION": REGION, "HOME": str(server.dir)}
        with open(self.dir / "logs" / "minio.log", "ab") as log:
            proc = subprocess.Popen(
                [str(ensure_minio()), "server", str(server.dir / "data"), "--address", address,
                 "--console-address", f"{self.host}:{free_port()}", "--quiet"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, cwd=server.dir)
        self._procs["minio"] = server.proc = proc
        url = f"{server.endpoint}/minio/health/ready"
        self._wait("minio", lambda: urllib.request.urlopen(url, timeout=2).status == 200, timeout)

    def _save_pids(self) -> None:
        if self.state is not None:
            self.state.pids = {name: p.pid for name, p in self._procs.items()}
            self.state.save()

    def _wait(self, name: str, probe: Any, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            proc = self._procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.dir}/logs/{name}.log:\n"
                                   + tail(self.dir / "logs" / f"{name}.log"))
            try:
                if probe():
                    return
            except (OSError, urllib.error.URLError, ssl.SSLError) as err:
                last = err
            except Exception as err:  # botocore's errors while the server boots
                last = err
            time.sleep(0.3)
        raise TimeoutError(f"{name} not ready after {timeout}s ({last}); log:\n"
                           + tail(self.dir / "logs" / f"{name}.log"))


def stop_pids(pids: Sequence[int], grace: float = 10.0) -> None:
    """SIGTERM each process group, wait up to ``grace``, then SIGKILL what is left."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5  # SIGKILL is not instant either
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.05)


def kubelet_client_certs(pki: Path) -> None:
    """A CA for the kubelet's API and the API server's client certificate from it."""
    if (pki / "apiserver-kubelet-client.crt").exists():
        return
    ca, client = pki / "kubelet-ca", pki / "apiserver-kubelet-client"
    for args in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=privatefm-kubelet-ca",
         "-keyout", f"{ca}.key", "-out", f"{ca}.crt"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/O=system:masters/CN=kube-apiserver-kubelet-client",
         "-keyout", f"{client}.key", "-out", f"{client}.csr"],
        ["x509", "-req", "-in", f"{client}.csr", "-days", "30", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
         "-CAcreateserial", "-out", f"{client}.crt"],
    ):
        subprocess.run(["openssl", *args], check=True, capture_output=True)


def kubeconfig_yaml(server: str, token: str, ca_file: str | None, user: str | None = None,
                    groups: Sequence[str] = (), name: str | None = None) -> str:
    """An admin kubeconfig; with ``user`` it impersonates that user (and groups). ``name`` names the
    user entry of a kubeconfig that does not impersonate (the kubelet's)."""
    cluster = {"server": server}
    if ca_file:
        cluster["certificate-authority"] = ca_file
    else:
        cluster["insecure-skip-tls-verify"] = True  # type: ignore[assignment]
    auth: dict[str, Any] = {"token": token}
    if user:
        auth["as"] = user
        if groups:
            auth["as-groups"] = list(groups)
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "privatefm",
        "clusters": [{"name": "privatefm", "cluster": cluster}],
        "users": [{"name": user or name or ADMIN_USER, "user": auth}],
        "contexts": [{"name": "privatefm", "context": {"cluster": "privatefm", "user": user or name or ADMIN_USER}}],
    }
    return json.dumps(config, indent=2)  # JSON is valid YAML


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
