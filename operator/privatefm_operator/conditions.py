"""kstatus-compatible conditions. Pure functions over plain dicts (the wire form).

``lastTransitionTime`` changes only when a condition's status changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
DEGRADED = "Degraded"
RECOVERING = "Recovering"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(type_: str, status: bool, reason: str, message: str, generation: int | None) -> dict[str, Any]:
    cond: dict[str, Any] = {"type": type_, "status": "True" if status else "False", "reason": reason,
                            "message": message}
    if generation is not None:
        cond["observedGeneration"] = generation
    return cond


def merge(old: Iterable[dict[str, Any]], new: Iterable[dict[str, Any]], at: str | None = None) -> list[dict[str, Any]]:
    """The ``new`` conditions, each keeping its old ``lastTransitionTime`` when its status is unchanged.

    Conditions in ``old`` whose type is not in ``new`` are kept as they were.
    """
    at = at or now()
    previous = {c["type"]: c for c in old}
    result = []
    for cond in new:
        before = previous.pop(cond["type"], None)
        stamp = before["lastTransitionTime"] if before and before.get("status") == cond["status"] else at
        result.append({**cond, "lastTransitionTime": stamp})
    return result + list(previous.values())


def find(conditions: Iterable[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def kstatus(generation: int | None, *, ready: bool, reconciling: bool, stalled: bool, reason: str,
            message: str) -> list[dict[str, Any]]:
    """The three kstatus conditions for one observation."""
    return [
        condition(READY, ready, reason, message, generation),
        condition(RECONCILING, reconciling, reason if reconciling else "Idle", message if reconciling else "",
                  generation),
        condition(STALLED, stalled, reason if stalled else "Progressing", message if stalled else "", generation),
    ]
