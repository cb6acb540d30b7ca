"""Argo CD's view of privatefm's objects: runs manifests/argocd/health.lua the way Argo CD does (Lua 5.1,
the object as the global ``obj``, a table with ``status`` and ``message`` back), and what each
captured status in tests/data/statuses/ must read as."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
HEALTH_LUA = REPO / "manifests" / "argocd" / "health.lua"
STATUSES = REPO / "tests" / "data" / "statuses"
# Argo CD health <-> kstatus status. Argo CD has no Terminating: an object being deleted is Progressing.
KSTATUS_OF = {"Healthy": ("Current",), "Progressing": ("InProgress", "Terminating"), "Degraded": ("Failed",)}
# What each captured case must read as (Argo CD health).
EXPECTED = {
    "learner-no-status": "Progressing",        # served by the API server before the operator wrote anything
    "learner-provisioning": "Progressing",     # the first status: Reconciling=True
    "learner-ready": "Healthy",
    "learner-spec-changed": "Progressing",     # Ready, and reconciling a new generation
    "learner-recovering": "Progressing",       # a fallback under way
    "learner-stalled": "Degraded",             # the fallback gave up
    "learner-deleting": "Progressing",         # awaiting a guardian
    "merge-no-status": "Progressing",
    "merge-planned": "Progressing",            # a version assigned, the Job about to start
    "merge-pending": "Progressing",
    "merge-running": "Progressing",
    "merge-succeeded": "Healthy",
    "merge-failed": "Degraded",
    "merge-unschedulable": "Progressing",      # Pending with the scheduler's reason
    "merge-unschedulable-stalled": "Degraded",  # ... past the pending timeout
}


def _to_lua(runtime: Any, value: Any) -> Any:
    if isinstance(value, Mapping):
        return runtime.table_from({k: _to_lua(runtime, v) for k, v in value.items() if v is not None})
    if isinstance(value, list):
        return runtime.table_from([_to_lua(runtime, v) for v in value if v is not None])
    return value


def lua_health(obj: Mapping[str, Any], script: str | None = None) -> tuple[str, str]:
    """(status, message) of Argo CD's health check for ``obj`` (gopher-lua is Lua 5.1: so is this)."""
    from lupa import lua51

    runtime = lua51.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = _to_lua(runtime, dict(obj))
    result = runtime.execute(script if script is not None else HEALTH_LUA.read_text())
    return str(result["status"]), str(result["message"])


def minimal(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What a health check reads of an object, as captured: kind, identity, generation, status (less
    kopf's internal progress record)."""
    meta = obj.get("metadata") or {}
    keep = {k: meta[k] for k in ("name", "namespace", "generation", "deletionTimestamp") if meta.get(k) is not None}
    out: dict[str, Any] = {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "metadata": keep}
    if obj.get("status") is not None:
        out["status"] = {k: v for k, v in obj["status"].items() if k != "kopf"}
    return out
