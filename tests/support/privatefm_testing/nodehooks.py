"""The pod runner's hooks, on a real node.

In the quick lane the pod runner calls a namespace's hook after a merge pod's process exits and
before it reports, so that a test can act between the pod's exit and the operator's look at the
result (tamper with what the pod wrote, hold the run open). On a real node the kubelet reports at
once, so the same moment is made by freezing the operator instead: when a managed pod appears in a
namespace that has a hook, the operator process gets SIGSTOP; once the pod has terminated the hook
runs with the pod and its exit code, then the operator gets SIGCONT and sees the result.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

from kubernetes import client

from privatefm_testing.podrunner import SELECTOR, Hooks

log = logging.getLogger("privatefm.nodehooks")


class NodeHookRunner:
    def __init__(self, api: client.ApiClient, hooks: Hooks, poll: float = 0.2) -> None:
        self.core = client.CoreV1Api(api)
        self.hooks = hooks
        self.poll = poll
        # The operator's process group now (it is restarted by some tests), set by its fixture.
        self.operator_pid: Callable[[], int | None] = lambda: None
        self._done: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> NodeHookRunner:
        self._thread = threading.Thread(target=self._loop, name="nodehooks", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        pid = self.operator_pid()
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig)

    def _pods(self, namespace: str) -> list[dict[str, Any]]:
        listing = self.core.list_namespaced_pod(namespace, label_selector=SELECTOR)
        return list(self.core.api_client.sanitize_for_serialization(listing).get("items", []))

    def _loop(self) -> None:
        while not self._stop.wait(self.poll):
            for namespace in list(self.hooks.by_namespace):
                try:
                    pods = self._pods(namespace)
                except Exception as err:  # the API server restarts in some tests
                    log.warning("listing pods in %s: %s", namespace, err)
                    continue
                for pod in pods:
                    key = pod["metadata"]["uid"]
                    if key not in self._done and namespace in self.hooks.by_namespace:
                        self._done.add(key)
                        self._intercept(namespace, pod["metadata"]["name"])

    def _intercept(self, namespace: str, name: str) -> None:
        self._signal(signal.SIGSTOP)
        try:
            while not self._stop.is_set():
                pod = self.core.api_client.sanitize_for_serialization(self.core.read_namespaced_pod(name, namespace))
                if pod["status"].get("phase") in ("Succeeded", "Failed"):
                    statuses = pod["status"].get("containerStatuses") or [{}]
                    code = int(((statuses[0].get("state") or {}).get("terminated") or {}).get("exitCode", -1))
                    self.hooks(pod, code)
                    return
                self._stop.wait(self.poll)
        except Exception as err:
            log.warning("intercepting %s/%s: %s", namespace, name, err)
        finally:
            self._signal(signal.SIGCONT)
