"""A real MinIO server on loopback, for tests of what the store lets each identity do.

versitygw (the cluster's S3 server) checks one key pair and nothing more; MinIO enforces IAM
user policies and STS session policies, so only against it can a test show that a merge
pod's credentials are denied everything outside its own run.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privatefm_testing.cluster import BIN, REPO_ROOT, free_port, pid_alive, stop_pids, tail

REGION = "us-east-1"


def ensure_minio() -> Path:
    """The pinned ``minio`` binary, built (and cached) by ``scripts/build-tools.sh`` when missing."""
    binary = BIN / "minio"
    if not binary.exists():
        subprocess.run(["bash", str(REPO_ROOT / "scripts" / "build-tools.sh")], check=True)
    return binary


@dataclass(frozen=True)
class Credentials:
    """One identity's S3 credentials at one endpoint; ``session_token`` for temporary ones."""

    endpoint: str
    access_key: str
    secret_key: str
    session_token: str | None = None
    region: str = REGION

    def client(self, service: str = "s3", **config: Any) -> Any:
        """A boto3 client; ``config`` adds botocore ``Config`` options."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            service, endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            aws_session_token=self.session_token,
            # No retries: a denial is the answer, and a test should see it at once.
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1, "mode": "standard"},
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


class MinioServer:
    """``minio server`` on 127.0.0.1 with one bucket; add users with attached policies."""

    def __init__(self, directory: Path, bucket: str = "privatefm") -> None:
        self.dir = directory
        self.bucket = bucket
        self.endpoint = ""
        self._root_user, self._root_password = "minio-root-" + secrets.token_hex(4), secrets.token_hex(16)
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = directory / "minio.log"

    @property
    def root(self) -> Credentials:
        if not self.endpoint:
            raise RuntimeError("the MinIO server is not started")
        return Credentials(self.endpoint, self._root_user, self._root_password)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 60.0) -> Credentials:
        """Starts the server, waits until it is ready, creates the bucket; returns root's credentials."""
        binary = ensure_minio()
        self.dir.mkdir(parents=True, exist_ok=True)
        port, console = free_port(), free_port()
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("MINIO_")}
        env = {**inherited, "MINIO_ROOT_USER": self._root_user, "MINIO_ROOT_PASSWORD": self._root_password,
               "MINIO_BROWSER": "off", "MINIO_UPDATE": "off", "MINIO_REGION": REGION, "HOME": str(self.dir)}
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(
                [str(binary), "server", str(self.dir / "data"), "--address", f"127.0.0.1:{port}",
                 "--console-address", f"127.0.0.1:{console}", "--quiet"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True, cwd=self.dir)
        self.endpoint = f"http://127.0.0.1:{port}"
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
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"minio exited with {self._proc.returncode}; log:\n{tail(self._log)}")
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
        if self._proc is None:
            return
        stop_pids([self._proc.pid], grace)
        self._proc.wait(timeout=grace)
        if pid_alive(self._proc.pid):
            raise RuntimeError(f"minio (pid {self._proc.pid}) is still running")
        self._proc = None

    def __enter__(self) -> MinioServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
