"""Runs Pods as local processes, in place of a scheduler, kubelet and container runtime.

It schedules as kube-scheduler would onto its one Node, whose labels are ``NODE_LABELS`` and which
has no GPUs: a pod whose nodeSelector that node does not match, or that asks for
``nvidia.com/gpu``, stays Pending with the scheduler's own condition (PodScheduled=False,
reason Unschedulable, and the scheduler's message), and is looked at again on every poll.

For every other Pending pod it selects, it binds the pod to that Node, resolves the
container's environment the way the kubelet does (plain values, the downward API, Secret and
ConfigMap references, ``envFrom``), runs the container's command, and reports the phase, exit
code and termination message back through the pod's status. What a container runtime does with
mounts, it does with paths: an environment value that names a mount path (an ``emptyDir``, the
termination-message file) is translated to a per-pod local directory. When running as root and
the pod asks for ``runAsUser``, the process runs as that user.

    privatefm-podrunner [--kubeconfig K] [--workdir D]     run until interrupted
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from privatefm_merge.clock import rfc3339

NODE = "privatefm-local"
NODE_LABELS = {"kubernetes.io/hostname": NODE, "privatefm.io/local-runner": "true"}
SELECTOR = "app.kubernetes.io/managed-by=privatefm-operator"
MAX_MESSAGE = 4096
log = logging.getLogger("privatefm.podrunner")
_FIELD = re.compile(r"^metadata\.(annotations|labels)\['(.+)'\]$")

Hook = Callable[[dict[str, Any], int], None]


class Hooks:
    """Per-namespace hooks the pod runner calls after a pod's process exits, before it reports (tests use
    them to tamper with what a merge pod wrote)."""

    def __init__(self) -> None:
        self.by_namespace: dict[str, Callable[[dict[str, Any], int], None]] = {}

    def __call__(self, pod: dict[str, Any], code: int) -> None:
        hook = self.by_namespace.get(pod["metadata"]["namespace"])
        if hook:
            hook(pod, code)


def field_ref(pod: dict[str, Any], path: str) -> str:
    meta = pod["metadata"]
    if m := _FIELD.match(path):
        return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
    simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"],
              "metadata.uid": meta.get("uid", ""), "spec.nodeName": NODE,
              "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default")}
    if path not in simple:
        raise ValueError(f"unsupported fieldRef {path}")
    return str(simple[path])


class PodRunner:
    def __init__(self, api: client.ApiClient, workdir: Path, selector: str = SELECTOR,
                 after_exit: Hook | None = None, poll: float = 0.5) -> None:
        self.core = client.CoreV1Api(api)
        self.workdir = workdir
        self.selector = selector
        self.after_exit = after_exit
        self.poll = poll
        self._stop = threading.Event()
        self._started: set[str] = set()
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> PodRunner:
        self._ensure_node()
        self._thread = threading.Thread(target=self._loop, name="podrunner", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for proc in list(self._procs.values()):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self._thread:
            self._thread.join(timeout=10)

    def _ensure_node(self) -> None:
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE, "labels": dict(NODE_LABELS)}}
        with contextlib.suppress(ApiException):
            self.core.create_node(node)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                live = set()
                for pod in self.core.api_client.sanitize_for_serialization(
                        self.core.list_pod_for_all_namespaces(label_selector=self.selector)).get("items", []):
                    key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
                    live.add(key)
                    if key not in self._started and (pod.get("status") or {}).get("phase") == "Pending" \
                            and not pod["metadata"].get("deletionTimestamp"):
                        why = unschedulable(pod)
                        if why is not None:
                            self._report_unschedulable(pod, why)
                            continue
                        self._started.add(key)
                        threading.Thread(target=self._run_pod, args=(pod,), name=f"pod {key}", daemon=True).start()
                for key in set(self._procs) - live:  # deleted while running
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self._procs[key].pid, signal.SIGKILL)
            except Exception as err:  # the API server may restart under tests; keep going
                log.warning("pod runner poll failed: %s", err)
            self._stop.wait(self.poll)

    def _report_unschedulable(self, pod: dict[str, Any], message: str) -> None:
        """What kube-scheduler writes on a pod it cannot place (once: the condition stays)."""
        current = next((c for c in (pod.get("status") or {}).get("conditions") or []
                        if c.get("type") == "PodScheduled"), None)
        if current is not None and current.get("status") == "False" and current.get("message") == message:
            return
        condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                     "lastProbeTime": None, "lastTransitionTime": rfc3339()}
        self.core.patch_namespaced_pod_status(pod["metadata"]["name"], pod["metadata"]["namespace"],
                                              {"status": {"phase": "Pending", "conditions": [condition]}})

    # ---- one pod ---------------------------------------------------------------------------
    def resolve_env(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        ns = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if ref := source.get("secretRef"):
                data = self._secret(ns, ref["name"], ref.get("optional", False))
            elif ref := source.get("configMapRef"):
                data = self._configmap(ns, ref["name"], ref.get("optional", False))
            else:
                continue
            env.update({prefix + k: v for k, v in data.items()})
        for var in container.get("env") or []:
            if "value" in var:
                env[var["name"]] = var["value"]
                continue
            source = var.get("valueFrom") or {}
            if ref := source.get("fieldRef"):
                env[var["name"]] = field_ref(pod, ref["fieldPath"])
            elif ref := source.get("secretKeyRef"):
                env[var["name"]] = self._secret(ns, ref["name"], ref.get("optional", False)).get(ref["key"], "")
            elif ref := source.get("configMapKeyRef"):
                env[var["name"]] = self._configmap(ns, ref["name"], ref.get("optional", False)).get(ref["key"], "")
        return env

    def _secret(self, ns: str, name: str, optional: bool) -> dict[str, str]:
        try:
            data = self.core.read_namespaced_secret(name, ns).data or {}
        except ApiException:
            if optional:
                return {}
            raise
        return {k: base64.b64decode(v).decode() for k, v in data.items()}

    def _configmap(self, ns: str, name: str, optional: bool) -> dict[str, str]:
        try:
            return dict(self.core.read_namespaced_config_map(name, ns).data or {})
        except ApiException:
            if optional:
                return {}
            raise

    def _run_pod(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        ns, name = meta["namespace"], meta["name"]
        key = f"{ns}/{name}"
        container = pod["spec"]["containers"][0]
        root = self.workdir / ns / name
        started = rfc3339()
        try:
            self._bind(ns, name)
            pod = self.core.api_client.sanitize_for_serialization(self.core.read_namespaced_pod(name, ns))
            env = self.resolve_env(pod, container)
            mounts = self._mounts(pod, container, root)
            env = {k: translate(v, mounts) for k, v in env.items()}
            # The image's PATH is ours, with this interpreter's scripts (privatefm-merge) first.
            env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "/usr/bin:/bin")])
            if os.environ.get("PYTHONPATH"):  # and so is its Python path (a checkout under test)
                env["PYTHONPATH"] = os.environ["PYTHONPATH"]
            message_file = Path(translate(container.get("terminationMessagePath", "/dev/termination-log"), mounts))
            # A path argument names what the container sees there, as an env value does (e.g.
            # ``--result-path /dev/termination-log``).
            command = [translate(arg, mounts) for arg in [*(container.get("command") or []),
                                                          *(container.get("args") or [])]]
            exe = shutil.which(command[0], path=env["PATH"]) if command else None
            if not exe:
                raise FileNotFoundError(f"executable {command[:1]} not found on PATH")
            self._status(ns, name, "Running", container, {"running": {"startedAt": started}})
            user = self._user(pod, container, root)
            with open(root / "container.log", "wb") as out:
                spawn = dict(env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
                try:
                    proc = subprocess.Popen([exe, *command[1:]], **spawn, **user)
                except PermissionError:
                    # The interpreter is not reachable by that user here (e.g. under /root): run as ourselves.
                    log.warning("pod %s: cannot run as uid %s on this machine; running as uid %s",
                                key, user.get("user"), os.geteuid())
                    proc = subprocess.Popen([exe, *command[1:]], **spawn)
                self._procs[key] = proc
                code = proc.wait()
            self._procs.pop(key, None)
            if self.after_exit:
                self.after_exit(pod, code)
            message = message_file.read_bytes()[:MAX_MESSAGE].decode(errors="replace") \
                if message_file.exists() else ""
            if not message and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                message = (root / "container.log").read_bytes()[-MAX_MESSAGE:].decode(errors="replace")
            terminated = {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                          "message": message, "startedAt": started, "finishedAt": rfc3339()}
        except Exception as err:
            log.warning("pod %s could not run: %s", key, err)
            terminated = {"exitCode": 128, "reason": "StartError", "message": str(err)[:MAX_MESSAGE],
                          "startedAt": started, "finishedAt": rfc3339()}
        phase = "Succeeded" if terminated["exitCode"] == 0 else "Failed"
        with contextlib.suppress(ApiException):
            self._status(ns, name, phase, container, {"terminated": terminated})

    def _bind(self, ns: str, name: str) -> None:
        body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name, "namespace": ns},
                "target": {"apiVersion": "v1", "kind": "Node", "name": NODE}}
        # The client cannot read a Binding back (its target is required but not returned).
        with contextlib.suppress(ValueError):
            self.core.create_namespaced_binding(ns, body)

    def _mounts(self, pod: dict[str, Any], container: dict[str, Any], root: Path) -> dict[str, Path]:
        """Mount path -> local directory, for emptyDir volumes and the termination-message file."""
        root.mkdir(parents=True, exist_ok=True)
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        mounts: dict[str, Path] = {}
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"], {})
            if "emptyDir" in volume:
                local = root / "volumes" / mount["name"]
                local.mkdir(parents=True, exist_ok=True)
                mounts[mount["mountPath"]] = local
            elif ref := volume.get("configMap"):  # e.g. the store's CA bundle: its keys (or items) as files
                local = root / "volumes" / mount["name"]
                local.mkdir(parents=True, exist_ok=True)
                data = self._configmap(pod["metadata"]["namespace"], ref["name"], ref.get("optional", False))
                items = ref.get("items") or [{"key": k, "path": k} for k in data]
                for item in items:
                    (local / item["path"]).write_text(data[item["key"]])
                mounts[mount["mountPath"]] = local
        mounts[container.get("terminationMessagePath", "/dev/termination-log")] = root / "termination-log"
        return mounts

    def _user(self, pod: dict[str, Any], container: dict[str, Any], root: Path) -> dict[str, Any]:
        ctx = {**(pod["spec"].get("securityContext") or {}), **(container.get("securityContext") or {})}
        uid = ctx.get("runAsUser")
        if os.geteuid() != 0 or uid is None:
            return {}
        gid = ctx.get("runAsGroup", uid)
        for path in [root, *root.rglob("*")]:
            os.chown(path, uid, gid)
        return {"user": uid, "group": gid, "extra_groups": []}

    def _status(self, ns: str, name: str, phase: str, container: dict[str, Any], state: dict[str, Any]) -> None:
        running = phase == "Running"
        stamp = rfc3339()
        status = {
            "phase": phase, "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "startTime": stamp,
            "conditions": [{"type": t, "status": "True" if running or t == "PodScheduled" else "False",
                            "lastTransitionTime": stamp} for t in ("PodScheduled", "Initialized", "ContainersReady",
                                                                   "Ready")],
            "containerStatuses": [{"name": container["name"], "image": container.get("image", ""),
                                   "imageID": "", "ready": running, "restartCount": 0, "started": running,
                                   "state": state}],
        }
        self.core.patch_namespaced_pod_status(name, ns, {"status": status})


def unschedulable(pod: dict[str, Any]) -> str | None:
    """The scheduler's message when the local node cannot take ``pod`` (None when it can): the
    messages are kube-scheduler's own, for a one-node cluster."""
    spec = pod.get("spec") or {}
    selector = spec.get("nodeSelector") or {}
    if any(NODE_LABELS.get(key) != value for key, value in selector.items()):
        return ("0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. preemption: "
                "0/1 nodes are available: 1 Preemption is not helpful for scheduling.")
    for container in spec.get("containers") or []:
        resources = container.get("resources") or {}
        wanted = {**(resources.get("requests") or {}), **(resources.get("limits") or {})}
        if str(wanted.get("nvidia.com/gpu", "0")) not in ("0", ""):
            return ("0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are available: "
                    "1 No preemption victims found for incoming pod.")
    return None


def translate(value: str, mounts: dict[str, Path]) -> str:
    """A path inside the container -> the local path it is mounted from (longest mount wins)."""
    for mount in sorted(mounts, key=len, reverse=True):
        if value == mount or value.startswith(mount.rstrip("/") + "/"):
            return str(mounts[mount]) + value[len(mount):]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="privatefm-podrunner", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"))
    parser.add_argument("--workdir", type=Path, default=Path(".run/pods"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s podrunner %(levelname)s %(message)s")
    runner = PodRunner(config.new_client_from_config(args.kubeconfig), args.workdir.resolve()).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    while not done.wait(1):
        pass
    runner.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
