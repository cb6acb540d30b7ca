"""A reachable cluster for tests: admin kubeconfig, the built kubectl, and acting as others."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from privatefm_testing.cluster import BIN, LocalCluster


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
        waits = [d for a in args if a.startswith("--timeout=") for d in [a.removeprefix("--timeout=")]]
        limit = 120 + (int(waits[0].rstrip("s")) if waits and waits[0].rstrip("s").isdigit() else 0)
        proc = subprocess.run(cmd, env=self.env(), text=True, capture_output=True, input=input, timeout=limit)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def wait_established(self, *crds: str, timeout: float = 60) -> None:
        """Polls until every CRD is Established. (``kubectl wait`` fails at once on a CRD whose
        status has no conditions yet, right after it was created.)"""
        def established(name: str) -> bool:
            proc = self.kubectl("get", "crd", name, "-o", "json", check=False)
            status = json.loads(proc.stdout).get("status") or {} if proc.returncode == 0 else {}
            return any(c.get("type") == "Established" and c.get("status") == "True"
                       for c in status.get("conditions") or [])
        wait_for(lambda: all(established(c) for c in crds), timeout, f"CRDs {', '.join(crds)} to be established")

    def api_client(self, as_user: str | None = None, as_groups: tuple[str, ...] = ()) -> Any:
        from kubernetes import config

        api = config.new_client_from_config(str(self.kubeconfig))
        if as_user:
            api.set_default_header("Impersonate-User", as_user)
            for group in as_groups:  # the client sends one header; enough for one group
                api.set_default_header("Impersonate-Group", group)
        return api


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    """Polls ``predicate`` until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def token_kubeconfig(admin: Path, token: str, out: Path) -> Path:
    """``admin``'s kubeconfig with its credentials replaced by a bearer token (e.g. a ServiceAccount's)."""
    config = yaml.safe_load(admin.read_text())
    for entry in config["users"]:
        entry["user"] = {"token": token}
    out.write_text(yaml.safe_dump(config))
    return out
