"""Runs the operator as a real subprocess (so a test can SIGKILL and restart it)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from privatefm_testing.cluster import S3Info, free_port

_SAMPLE = re.compile(r'^(\w+)(\{[^}]*\})? ([0-9.eE+-]+|NaN|[+-]Inf)$')


class OperatorProcess:
    def __init__(self, kubeconfig: Path, s3: S3Info, log_path: Path, **settings: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "PRIVATEFM_S3_ENDPOINT": s3.endpoint, "PRIVATEFM_S3_BUCKET": s3.bucket,
            # The operator's own identity, never the store's admin.
            "PRIVATEFM_S3_ACCESS_KEY": s3.operator.access_key, "PRIVATEFM_S3_SECRET_KEY": s3.operator.secret_key,
            "PRIVATEFM_HTTP_PORT": str(self.port), "PRIVATEFM_LIVENESS_PORT": str(free_port()),
            **{f"PRIVATEFM_{k.upper()}": v for k, v in settings.items()},
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen([sys.executable, "-m", "privatefm_operator"], env=self.env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if urllib.request.urlopen(f"{self.url}/readyz", timeout=1).status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"operator not ready:\n{self.log_tail()}")

    @contextlib.contextmanager
    def restarted(self, **env: str) -> Iterator[OperatorProcess]:
        """This operator, restarted with ``env`` and put back afterwards (a test that needs other
        settings must not start a second operator: two would race)."""
        saved = {key: self.env.get(key) for key in env}
        self.stop()
        self.env.update(env)
        self.start()
        try:
            yield self
        finally:
            self.stop()
            for key, value in saved.items():
                if value is None:
                    self.env.pop(key, None)
                else:
                    self.env[key] = value
            self.start()

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> dict[str, float]:
        """``name{labels}`` -> value, from /metrics."""
        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=5).read().decode()
        samples = {}
        for line in text.splitlines():
            if m := _SAMPLE.match(line):
                samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return samples

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""
