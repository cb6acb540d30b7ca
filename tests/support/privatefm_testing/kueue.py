"""A real Kueue controller manager beside the local control plane (tests/test_kueue.py).

``scripts/build-tools.sh`` builds ``kueue`` from its Go module (``sigs.k8s.io/kueue``, pinned in
``scripts/versions.env``) and keeps its CRDs beside the binary. This runs it as a process, as its
Deployment would, with only the batch/v1 Job integration, no leader election and no webhooks:

- Its webhooks (defaulting and validation of Kueue's own objects and of Jobs) are not registered
  with the API server: the operator's Jobs are already suspended and labelled, which is all
  Kueue's Job reconciler needs. The webhook server still starts (on loopback, with a throwaway
  self-signed certificate), because the manager always runs it.
- Without Kueue's internal certificate management, the manager reads its metrics certificate from
  the fixed path ``/etc/kueue/metrics/certs``. The process runs in a mount namespace of its own in
  which /etc is an overlay whose writes land in this run's directory, so the host's /etc is never
  touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from privatefm_testing.cluster import BIN, free_port, tail
from privatefm_testing.kube import Kube

KUEUE = BIN / "kueue"
CRDS = BIN / "kueue-crds"
NAMESPACE = "kueue-system"


def available() -> str | None:
    """Why Kueue cannot run here, or None."""
    if not KUEUE.exists() or not CRDS.is_dir():
        return f"{KUEUE} is not built (scripts/build-tools.sh builds it)"
    if os.geteuid() != 0:
        return "Kueue's fixed metrics-certificate path needs a private mount namespace (root)"
    return None


def self_signed(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=kueue-test", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(directory / "tls.key"), "-out", str(directory / "tls.crt")],
                   check=True, capture_output=True)


class KueueController:
    def __init__(self, kube: Kube, directory: Path) -> None:
        self.kube, self.directory = kube, directory
        self.health_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "kueue.log"

    def install_crds(self) -> None:
        for crd in sorted(CRDS.glob("*.yaml")):  # server-side: they pass the client-side annotation limit
            self.kube.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
        names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in sorted(CRDS.glob("*.yaml"))]
        self.kube.wait_established(*names)

    def config(self) -> dict[str, Any]:
        return {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2", "kind": "Configuration", "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health_port}"},
            "metrics": {"bindAddress": f"127.0.0.1:{free_port()}"},
            "webhook": {"host": "127.0.0.1", "port": free_port(), "certDir": str(self.directory / "webhook")},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "integrations": {"frameworks": ["batch/job"]},
        }

    def start(self, timeout: float = 90) -> None:
        self.install_crds()
        self.kube.kubectl("create", "namespace", NAMESPACE, check=False)
        self_signed(self.directory / "webhook")
        self_signed(self.directory / "metrics")
        (self.directory / "etc-upper").mkdir(exist_ok=True)
        (self.directory / "etc-work").mkdir(exist_ok=True)
        config = self.directory / "config.yaml"
        config.write_text(yaml.safe_dump(self.config()))
        certs = "/etc/kueue/metrics/certs"
        inner = " && ".join([
            "mount --make-rprivate /",
            f"mount -t overlay overlay -o lowerdir=/etc,upperdir={self.directory}/etc-upper,"
            f"workdir={self.directory}/etc-work /etc",
            f"mkdir -p {certs}",
            f"cp {self.directory}/metrics/tls.crt {self.directory}/metrics/tls.key {certs}/",
            f"exec {shlex.quote(str(KUEUE))} --config={config} --visibility-server-port={free_port()} "
            "--feature-gates=VisibilityOnDemand=false",
        ])
        env = {**os.environ, "KUBECONFIG": str(self.kube.kubeconfig)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(["unshare", "--mount", "sh", "-c", inner], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kueue exited {self.proc.returncode}:\n{tail(self.log_path)}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/readyz", timeout=1).status == 200:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"kueue not ready:\n{tail(self.log_path)}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def uninstall(self) -> None:
        """Leaves the cluster as it was: Kueue's namespace and CRDs, and every object of them, go.
        Kueue's finalizers on what is left (it is stopped by now) are removed first."""
        for crd in sorted(CRDS.glob("*.yaml")):
            resource = yaml.safe_load(crd.read_text())["metadata"]["name"]
            listed = self.kube.kubectl("get", resource, "-A", "-o", "json", check=False)
            for item in (json.loads(listed.stdout)["items"] if listed.returncode == 0 else []):
                meta = item["metadata"]
                where = ["-n", meta["namespace"]] if meta.get("namespace") else []
                self.kube.kubectl("patch", resource, meta["name"], *where, "--type=merge",
                                  "-p", '{"metadata":{"finalizers":null}}', check=False)
            self.kube.kubectl("delete", "-f", str(crd), "--wait=false", check=False)
        self.kube.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
