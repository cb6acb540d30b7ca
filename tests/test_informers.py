"""The operator's own watches of its children (``privatefm_operator.informers``) against the real
API server: the first list, every later change exactly as the server reports it, watch windows that
end and resume without a relist, and a deletion made while no one watched reported at the relist."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from privatefm_operator import informers
from privatefm_operator.kube import Kube as OperatorKube
from privatefm_testing.kube import Kube

pytestmark = pytest.mark.cluster


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, bool, str]] = []  # name, deleted, resourceVersion
        self.lock = threading.Lock()

    def __call__(self, kind: str, body: dict[str, Any], deleted: bool) -> None:
        assert kind == "LimitRange"
        with self.lock:
            self.events.append((body["metadata"]["name"], deleted, body["metadata"].get("resourceVersion", "")))

    def wait(self, what: Callable[[list[tuple[str, bool, str]]], bool], timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if what(list(self.events)):
                    return
            time.sleep(0.05)
        raise AssertionError(f"not seen in {timeout} s: {self.events}")


def limit_range(namespace: str, name: str, label: str, max_cpu: str = "2") -> str:
    return json.dumps({"apiVersion": "v1", "kind": "LimitRange",
                       "metadata": {"name": name, "namespace": namespace, "labels": {"privatefm-test/informer": label}},
                       "spec": {"limits": [{"type": "Container", "max": {"cpu": max_cpu}}]}})


def test_list_then_every_change_then_a_relist_reports_what_was_deleted_unwatched(
        kube: Kube, namespace: str, uid: str) -> None:
    api = OperatorKube(kube.api_client())
    selector = f"privatefm-test/informer={uid}"
    kube.kubectl("apply", "-f", "-", input=limit_range(namespace, "before", uid))
    kube.kubectl("apply", "-f", "-", input=limit_range(namespace, "unlabelled", "someone-else"))
    seen = Recorder()
    group = informers.Informers(api, ["LimitRange"], selector, seen, lambda kind: []).start()
    try:
        assert group.wait_synced(20)
        seen.wait(lambda e: ("before", False) in [(n, d) for n, d, _ in e])
        kube.kubectl("apply", "-f", "-", input=limit_range(namespace, "after", uid))
        seen.wait(lambda e: any(n == "after" and not d for n, d, _ in e))
        kube.kubectl("apply", "-f", "-", input=limit_range(namespace, "after", uid, max_cpu="3"))
        seen.wait(lambda e: sum(n == "after" and not d for n, d, _ in e) == 2)
        kube.kubectl("delete", "limitrange", "after", "-n", namespace)
        seen.wait(lambda e: ("after", True) in [(n, d) for n, d, _ in e])
        assert not [e for e in seen.events if e[0] == "unlabelled"], "the selector was not applied"
    finally:
        group.stop()
    # What this process remembered, deleted while no watch ran: the next list reports it gone.
    kube.kubectl("delete", "limitrange", "before", "-n", namespace)
    again = Recorder()
    group = informers.Informers(api, ["LimitRange"], selector, again,
                                lambda kind: [(namespace, "before")] if kind == "LimitRange" else []).start()
    try:
        again.wait(lambda e: [(n, d) for n, d, _ in e] == [("before", True)])
    finally:
        group.stop()


def test_watch_windows_end_and_resume_from_the_last_version_without_a_relist(
        kube: Kube, namespace: str, uid: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(informers, "WINDOW_SECONDS", 1)  # the API server ends each watch after 1 s
    api = OperatorKube(kube.api_client())
    lists: list[str] = []
    list_page = api.list_page

    def counted(*args: Any) -> dict[str, Any]:
        lists.append(args[0])
        return list_page(*args)

    monkeypatch.setattr(api, "list_page", counted)
    seen = Recorder()
    group = informers.Informers(api, ["LimitRange"], f"privatefm-test/informer={uid}", seen, lambda kind: []).start()
    try:
        assert group.wait_synced(20)
        for i in range(3):
            kube.kubectl("apply", "-f", "-", input=limit_range(namespace, f"lr-{i}", uid))
            time.sleep(1.5)  # at least one window ends between two changes
        seen.wait(lambda e: {n for n, _, _ in e} == {"lr-0", "lr-1", "lr-2"})
        time.sleep(2.5)
    finally:
        group.stop()
    assert lists == ["LimitRange"], "a window's end must not relist"
    versions = [v for _, _, v in seen.events]
    assert len(versions) == len(set(versions)) == 3, f"each change exactly once: {seen.events}"


def test_the_operators_client_counts_each_request_by_verb_kind_and_answer(kube: Kube, namespace: str,
                                                                          uid: str) -> None:
    """``privatefm_api_requests_total``: what the operator costs the API server, from its own client."""
    from prometheus_client import REGISTRY

    def count(verb: str, kind: str, code: str) -> float:
        return REGISTRY.get_sample_value("privatefm_api_requests_total",
                                         {"verb": verb, "resource": kind, "code": code}) or 0.0

    api = OperatorKube(kube.api_client())
    body = json.loads(limit_range(namespace, f"counted-{uid}", uid))
    before = {key: count(*key) for key in [("get", "LimitRange", "404"), ("apply", "LimitRange", "2xx"),
                                           ("get", "LimitRange", "2xx"), ("list", "LimitRange", "2xx"),
                                           ("delete", "LimitRange", "2xx"), ("apply", "LimitRange", "422")]}
    assert api.get("LimitRange", body["metadata"]["name"], namespace) is None
    api.apply(body)
    assert api.get("LimitRange", body["metadata"]["name"], namespace) is not None
    assert [o["metadata"]["name"] for o in api.list("LimitRange", namespace, f"privatefm-test/informer={uid}")] == [
        body["metadata"]["name"]]
    with pytest.raises(ApiException) as refused:  # a name the API server's validation refuses
        api.apply({**body, "metadata": {**body["metadata"], "name": "Not_A_Name"}})
    assert refused.value.status == 422
    assert api.delete("LimitRange", body["metadata"]["name"], namespace)
    assert {key: count(*key) - n for key, n in before.items()} == {key: 1.0 for key in before}
