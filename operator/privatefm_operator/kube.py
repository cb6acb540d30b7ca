"""The only module that talks to the Kubernetes API.

Children are written with server-side apply under one field manager, so an apply both creates
what is missing and restores what drifted, and is a no-op when nothing changed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from privatefm_merge.clock import rfc3339

from privatefm_operator.metrics import API_REQUESTS

FIELD_MANAGER = "privatefm-operator"
log = logging.getLogger(__name__)

# kind -> (API path prefix, plural, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "Namespace": ("/api/v1", "namespaces", False),
    "ServiceAccount": ("/api/v1", "serviceaccounts", True),
    "Secret": ("/api/v1", "secrets", True),
    "ResourceQuota": ("/api/v1", "resourcequotas", True),
    "LimitRange": ("/api/v1", "limitranges", True),
    "Pod": ("/api/v1", "pods", True),
    "Event": ("/api/v1", "events", True),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies", True),
    "CronJob": ("/apis/batch/v1", "cronjobs", True),
    "Job": ("/apis/batch/v1", "jobs", True),
    "LearnerNamespace": ("/apis/privatefm.io/v1alpha1", "learnernamespaces", False),
    "AdapterMerge": ("/apis/privatefm.io/v1alpha1", "adaptermerges", True),
    "LocalQueue": ("/apis/kueue.x-k8s.io/v1beta2", "localqueues", True),
    "Lease": ("/apis/coordination.k8s.io/v1", "leases", True),
}


class Kube:
    def __init__(self, api: client.ApiClient | None = None, connections: int = 32) -> None:
        """``connections``: kept open to the API server; at least the reconcile threads, or each
        thread past the pool's size would open (and close) a TLS connection per request."""
        if api is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()
            configuration = client.Configuration.get_default_copy()
            configuration.connection_pool_maxsize = connections
            api = client.ApiClient(configuration)
        self.api = api

    # ---- generic REST ----------------------------------------------------------------------
    def _path(self, kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        prefix, plural, namespaced = RESOURCES[kind]
        path = prefix + (f"/namespaces/{namespace}" if namespaced and namespace is not None else "") + f"/{plural}"
        if name:
            path += f"/{name}"
        if sub:
            path += f"/{sub}"
        return path

    def _call(self, verb: str, kind: str, method: str, path: str, body: Any = None,
              query: list[tuple[str, str]] | None = None, content_type: str = "application/json") -> Any:
        """One request; ``verb`` and ``kind`` label it in ``privatefm_api_requests_total``."""
        with counted(verb, kind):
            return self.api.call_api(
                path, method, query_params=query or [], body=body,
                header_params={"Content-Type": content_type, "Accept": "application/json"},
                response_types_map={200: "object", 201: "object"}, auth_settings=["BearerToken"],
                _return_http_data_only=True,
            )

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        try:
            return dict(self._call("get", kind, "GET", self._path(kind, namespace, name)))
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def wait_until_discoverable(self, group_version_path: str, plural: str, timeout: float = 60.0) -> bool:
        """Polls API discovery until ``plural`` is listed under ``group_version_path``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                found = self._call("discovery", plural, "GET", group_version_path).get("resources", [])
                if any(r.get("name") == plural for r in found):
                    return True
            except ApiException as err:
                if err.status != 404:
                    raise
            time.sleep(1.0)
        return False

    def list(self, kind: str, namespace: str | None = None, selector: str | None = None) -> list[dict[str, Any]]:
        query = [("labelSelector", selector)] if selector else []
        return list(self._call("list", kind, "GET", self._path(kind, namespace), query=query).get("items", []))

    def list_page(self, kind: str, selector: str, limit: int, continue_: str | None) -> dict[str, Any]:
        """One page of a cluster-wide list: ``items``, and ``metadata`` with ``resourceVersion`` and
        ``continue``."""
        query = [("labelSelector", selector), ("limit", str(limit))] + ([("continue", continue_)] if continue_ else [])
        return dict(self._call("list", kind, "GET", self._path(kind, None), query=query))

    def watch(self, kind: str, selector: str, resource_version: str, seconds: int) -> Iterator[dict[str, Any]]:
        """A cluster-wide watch from ``resource_version``, with bookmarks, that the API server ends
        after ``seconds``. Yields its events (``type``, ``object``) as they arrive. A connection that
        stays silent past the server's own deadline is given up (``urllib3`` raises)."""
        query = [("watch", "true"), ("labelSelector", selector), ("resourceVersion", resource_version),
                 ("allowWatchBookmarks", "true"), ("timeoutSeconds", str(seconds))]
        with counted("watch", kind):
            response = self.api.call_api(self._path(kind, None), "GET", query_params=query,
                                         header_params={"Accept": "application/json"}, auth_settings=["BearerToken"],
                                         _preload_content=False, _return_http_data_only=True,
                                         _request_timeout=(10, seconds + 30))
        try:
            for line in response:
                if line.strip():
                    yield json.loads(line)
        finally:
            response.close()  # a stream given up part-way cannot go back to the pool

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        path = self._path(obj["kind"], meta.get("namespace"), meta["name"])
        return dict(self._call("apply", obj["kind"], "PATCH", path, body=obj,
                               content_type="application/apply-patch+yaml",
                               query=[("fieldManager", FIELD_MANAGER), ("force", "true")]))

    def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Creates ``obj``; returns None when it already exists (deterministic names make this safe)."""
        meta = obj["metadata"]
        try:
            return dict(self._call("create", obj["kind"], "POST", self._path(obj["kind"], meta.get("namespace")),
                                   body=obj, query=[("fieldManager", FIELD_MANAGER)]))
        except ApiException as err:
            if err.status == 409:
                return None
            raise

    def patch(self, kind: str, name: str, patch: dict[str, Any], namespace: str | None = None,
              subresource: str | None = None) -> dict[str, Any]:
        """JSON merge patch. Put ``metadata.resourceVersion`` in ``patch`` for optimistic concurrency."""
        return dict(self._call("patch", kind, "PATCH", self._path(kind, namespace, name, subresource), body=patch,
                               content_type="application/merge-patch+json",
                               query=[("fieldManager", FIELD_MANAGER)]))

    def delete(self, kind: str, name: str, namespace: str | None = None, propagation: str | None = None) -> bool:
        """Deletes one object (in the background); False when it did not exist. ``propagation``:
        e.g. ``Background`` for a Job, whose pods the API would otherwise orphan."""
        query = [("propagationPolicy", propagation)] if propagation else []
        try:
            self._call("delete", kind, "DELETE", self._path(kind, namespace, name), query=query)
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    # ---- events ----------------------------------------------------------------------------
    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about ``obj``. Failure to post is logged, never raised."""
        meta = obj["metadata"]
        namespace = meta.get("namespace") or "default"
        now = rfc3339()
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:10]}", "namespace": namespace},
            "involvedObject": {"apiVersion": obj["apiVersion"], "kind": obj["kind"], "name": meta["name"],
                               "namespace": meta.get("namespace"), "uid": meta.get("uid"),
                               "resourceVersion": meta.get("resourceVersion")},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": FIELD_MANAGER}, "reportingComponent": FIELD_MANAGER,
            "reportingInstance": FIELD_MANAGER, "action": reason,
            "firstTimestamp": now, "lastTimestamp": now, "eventTime": None, "count": 1,
        }
        try:
            self._call("create", "Event", "POST", self._path("Event", namespace), body=body)
        except ApiException as err:
            log.warning("could not post event %s: %s", reason, err.reason)
        except urllib3.exceptions.HTTPError as err:  # the API server is away: the event is lost, not the work
            log.warning("could not post event %s: %s", reason, err)


@contextlib.contextmanager
def counted(verb: str, kind: str) -> Iterator[None]:
    """Counts one request in ``privatefm_api_requests_total``, labelled with its answer's status."""
    code = "error"
    try:
        yield
        code = "2xx"
    except ApiException as err:
        code = str(err.status)
        raise
    finally:
        API_REQUESTS.labels(verb, kind, code).inc()


def api_message(err: ApiException) -> str:
    """The API server's own explanation of a refusal (its Status message), or the HTTP reason."""
    try:
        return str(json.loads(err.body or "{}").get("message") or err.reason)
    except (ValueError, AttributeError):
        return str(err.reason)


def is_conflict(err: Exception) -> bool:
    return isinstance(err, ApiException) and err.status == 409
