"""What the operator knows of the learners' children without asking: change-driven provisioning.

The operator watches the objects it makes (its managed-by label: Namespaces, ServiceAccounts,
NetworkPolicies, ResourceQuotas, LimitRanges, CronJobs) and remembers, for each, whether the last
copy it saw is what it asked for.

- **Apply only on difference.** ``provision`` applies a child only when the last copy seen does not
  satisfy what the learner's spec asks for (``decisions.satisfies``: every field the operator sets
  has its value), or when what it asks for changed (a spec change: the request differs from the
  one remembered, and its digest annotation makes the apply remove fields no longer set). An idle
  learner's pass makes no request.
- **Drift is repaired when it happens.** A watch event that leaves a child unlike what was asked
  for, or deletes it, reconciles its learner at once (``on_event`` names it). The learner is the one
  the operator recorded when it applied the child, never what the child's labels say: its tenant
  might edit those.
- **Every namespace, not only the learners'.** Namespaces are watched without the label selector,
  so that a new learner's pass knows, without a GET, whether the name its learnerId maps to is free
  or taken by a namespace the operator did not make (``namespace``, once ``namespaces_listed``).
  The claim's race with a namespace created after that view is closed by ``decisions.made_by``
  (in ``learner.provision``) and by the confinement admission policy.
- **Small.** Per child it keeps the request, compressed, and one verdict; per namespace its labels
  and phase. A child not seen yet is applied, as every pass did before (after a restart, each
  learner's first pass applies its children once); the full resync ignores what is remembered.
"""

from __future__ import annotations

import json
import threading
import zlib
from typing import Any

from privatefm_operator import decisions, naming

Key = tuple[str, str, str]  # kind, namespace ("" for cluster-scoped), name
# The kinds watched by the managed-by label (``informers``; their API paths are ``kube.RESOURCES``),
# and LocalQueues with Kueue. Namespaces are watched too, all of them.
WATCHED = ("ServiceAccount", "NetworkPolicy", "ResourceQuota", "LimitRange", "CronJob")


def key_of(kind: str, meta: dict[str, Any]) -> Key:
    return kind, meta.get("namespace") or "", meta["name"]


def _digest(obj: dict[str, Any]) -> str:
    return str((obj["metadata"].get("annotations") or {}).get(naming.DESIRED_HASH) or decisions.desired_hash(obj))


def _pack(obj: dict[str, Any]) -> bytes:
    return zlib.compress(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


class Children:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._asked: dict[Key, tuple[str, str, bytes]] = {}  # learner, the request's digest, the request (packed)
        self._satisfied: dict[Key, bool] = {}           # the last copy seen is what was asked
        self._by_learner: dict[str, set[Key]] = {}       # learner: the keys of its children
        self._namespaces: dict[str, dict[str, Any]] = {}  # every namespace: {"labels", "phase"} as last seen
        self.namespaces_listed = threading.Event()  # set by the Namespaces' watch once it has listed them all

    # ---- provisioning ------------------------------------------------------------------------
    def needs_apply(self, desired: dict[str, Any]) -> str | None:
        """Why ``desired`` must be applied (``unseen``, ``changed``, ``drifted``), or None.
        ``desired`` carries its digest (``decisions.with_desired_hash``): comparing it is enough."""
        key = key_of(desired["kind"], desired["metadata"])
        with self._lock:
            asked = self._asked.get(key)
            if asked is None or key not in self._satisfied:
                return "unseen"
            if asked[1] != _digest(desired):
                return "changed"
            return None if self._satisfied[key] else "drifted"

    def applied(self, learner: str, desired: dict[str, Any], result: dict[str, Any]) -> None:
        """Records an apply and what the API server answered."""
        key = key_of(desired["kind"], desired["metadata"])
        with self._lock:
            self._asked[key] = (learner, _digest(desired), _pack(desired))
            self._by_learner.setdefault(learner, set()).add(key)
            self._satisfied[key] = decisions.satisfies(desired, result)
            if desired["kind"] == "Namespace":
                self._see_namespace(result)

    def settled(self, learner: str) -> bool:
        """Every child applied for ``learner`` is, as last seen, what was asked (and some were)."""
        with self._lock:
            keys = self._by_learner.get(learner) or set()
            return bool(keys) and all(self._satisfied.get(key) for key in keys)

    def namespace(self, name: str) -> dict[str, Any] | None:
        """A namespace as last seen: ``{"metadata": {"labels"}, "status": {"phase"}}``, or None."""
        with self._lock:
            return self._namespaces.get(name)

    def namespace_absent(self, name: str) -> bool:
        """The Namespaces' watch has listed them all and has not seen ``name``."""
        return self.namespaces_listed.is_set() and self.namespace(name) is None

    # ---- watch events ------------------------------------------------------------------------
    def on_event(self, kind: str, body: dict[str, Any], deleted: bool) -> str | None:
        """Takes a watch event; returns the learner to reconcile when its child drifted or vanished."""
        key = key_of(kind, body["metadata"])
        with self._lock:
            if kind == "Namespace":
                if deleted:
                    self._namespaces.pop(key[2], None)
                else:
                    self._see_namespace(body)
            asked = self._asked.get(key)
            if asked is None:
                return None  # not asked for by this process yet: the learner's own pass compares
            learner, _, packed = asked
            ok = not deleted and decisions.satisfies(json.loads(zlib.decompress(packed)), body)
            self._satisfied[key] = ok
        return None if ok else learner

    def known(self, kind: str) -> list[tuple[str, str]]:
        """(namespace, name) of every child of ``kind`` this process has applied; every namespace seen."""
        with self._lock:
            if kind == "Namespace":
                return [("", name) for name in self._namespaces]
            return [(ns, name) for k, ns, name in self._asked if k == kind]

    def forget(self, learner: str) -> None:
        """A learner is gone: nothing of it is kept any longer."""
        with self._lock:
            for key in self._by_learner.pop(learner, set()):
                self._asked.pop(key, None)
                self._satisfied.pop(key, None)

    def _see_namespace(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        self._namespaces[meta["name"]] = {"metadata": {"name": meta["name"], "labels": dict(meta.get("labels") or {})},
                                          "status": {"phase": (body.get("status") or {}).get("phase")}}
