"""A real MinIO server on loopback, for tests of what the store lets each identity do.

MinIO enforces IAM user policies and STS session policies, so against it a test can show
that a merge pod's credentials are denied everything outside its own run. It is the S3
server of the local cluster (``LocalCluster``) and of the store matrix tests.

The server is the pinned build from ``scripts/build-tools.sh``. It runs in its own process
group with its root credentials in its environment (``MINIO_ROOT_USER``/``MINIO_ROOT_PASSWORD``);
users and policies are made through its admin API with the ``minio`` package's ``MinioAdmin``,
which signs and encrypts those requests as the server expects.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from privatefm_testing.cluster import BIN, REGION, REPO_ROOT, Credentials, free_port, pid_alive, stop_pids, tail


def ensure_minio() -> Path:
    """The pinned ``minio`` binary, built (and cached) by ``scripts/build-tools.sh`` when missing."""
    binary = BIN / "minio"
    if not binary.exists():
        subprocess.run(["bash", str(REPO_ROOT / "scripts" / "build-tools.sh")], check=True)
    return binary


class MinioServer:
    """``minio server`` on ``host`` (127.0.0.1, or a node's bridge gateway so that pods reach it) with
    one bucket; add users with attached policies."""

    def __init__(self, directory: Path, bucket: str = "privatefm", log: Path | None = None,
                 host: str = "127.0.0.1") -> None:
        self.dir = directory
        self.host = host
        self.bucket = bucket
        self.endpoint = ""
        self._root_user, self._root_password = "minio-root-" + secrets.token_hex(4), secrets.token_hex(16)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = log or directory / "minio.log"

    @property
    def root(self) -> Credentials:
        if not self.endpoint:
            raise RuntimeError("the MinIO server is not started")
        return Credentials(self.endpoint, self._root_user, self._root_password)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 60.0) -> Credentials:
        """Starts the server, waits until it is ready, creates the bucket; returns root's credentials."""
        binary = ensure_minio()
        self.dir.mkdir(parents=True, exist_ok=True)
        port, console = free_port(), free_port()
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("MINIO_")}
        env = {**inherited, "MINIO_ROOT_USER": self._root_user, "MINIO_ROOT_PASSWORD": self._root_password,
               "MINIO_BROWSER": "off", "MINIO_UPDATE": "off", "MINIO_REGION": REGION, "HOME": str(self.dir)}
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(binary), "server", str(self.dir / "data"), "--address", f"{self.host}:{port}",
                 "--console-address", f"{self.host}:{console}", "--quiet"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, cwd=self.dir)
        self.endpoint = f"http://{self.host}:{port}"
        try:
            self._wait_ready(timeout)
            self.root.client().create_bucket(Bucket=self.bucket)
        except BaseException:
            self.stop()
            raise
        return self.root

    def _wait_ready(self, timeout: float) -> None:
        url = f"{self.endpoint}/minio/health/ready"
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"minio exited with {self.proc.returncode}; log:\n{tail(self._log)}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (OSError, urllib.error.URLError) as err:
                last = err
            time.sleep(0.2)
        raise TimeoutError(f"minio not ready after {timeout}s ({last}); log:\n{tail(self._log)}")

    def add_user(self, name: str, policy: dict[str, Any]) -> Credentials:
        """A new user ``name`` with ``policy`` attached as the named policy ``<name>-policy``."""
        secret = secrets.token_hex(16)
        admin = self.root.admin()
        admin.policy_add(f"{name}-policy", policy=policy)
        admin.user_add(name, secret)
        admin.attach_policy([f"{name}-policy"], user=name)
        return Credentials(self.endpoint, name, secret)

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None:
            return
        stop_pids([self.proc.pid], grace)
        self.proc.wait(timeout=grace)
        if pid_alive(self.proc.pid):
            raise RuntimeError(f"minio (pid {self.proc.pid}) is still running")
        self.proc = None

    def __enter__(self) -> MinioServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
