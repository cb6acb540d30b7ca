"""A line-by-line port of kstatus's ``Compute`` (sigs.k8s.io/cli-utils/pkg/kstatus/status, status.go,
generic.go and core.go at cli-utils 5895ad6c, 2025-10-21) for custom resources: the kinds kstatus has
no built-in rules for, which is what LearnerNamespace and AdapterMerge are to it.

    Compute = checkGenericProperties        deletionTimestamp -> Terminating;
                                            checkGeneration: status.observedGeneration present and
                                              != metadata.generation -> InProgress;
                                            the first condition, in list order, of Reconciling=True
                                              (-> InProgress) or Stalled=True (-> Failed)
            → GetLegacyConditionsFn         built-in kinds only: none here
            → checkReadyCondition           the first Ready condition: True -> Current,
                                              False or Unknown -> InProgress
            → Current                       "the absence of any known conditions means current"

A missing status.observedGeneration skips the generation check (so an object without any status is
Current to kstatus); a value that is not an integer is an error, as NestedInt64 makes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

IN_PROGRESS, FAILED, CURRENT, TERMINATING = "InProgress", "Failed", "Current", "Terminating"


@dataclass(frozen=True)
class Result:
    status: str
    message: str


class KstatusError(ValueError):
    pass


def _nested(obj: Mapping[str, Any], *path: str) -> tuple[Any, bool]:
    node: Any = obj
    for key in path:
        if not isinstance(node, Mapping) or key not in node or node[key] is None:
            return None, False
        node = node[key]
    return node, True


def _int64(obj: Mapping[str, Any], *path: str) -> tuple[int | None, bool]:
    value, found = _nested(obj, *path)
    if not found:
        return None, False
    if isinstance(value, bool) or not isinstance(value, int):
        raise KstatusError(f"{'.'.join(path)} accessor error: {value!r} is of the type {type(value).__name__}, "
                           "expected int64")
    return value, True


def _conditions(obj: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """GetObjectWithConditions: status.conditions as BasicConditions (a wrong shape is an error)."""
    value, found = _nested(obj, "status", "conditions")
    if not found:
        return []
    if not isinstance(value, list) or not all(isinstance(c, Mapping) for c in value):
        raise KstatusError("status.conditions is not a list of conditions")
    return value


def compute(obj: Mapping[str, Any]) -> Result:
    deletion, found = _nested(obj, "metadata", "deletionTimestamp")
    if found and deletion != "":
        return Result(TERMINATING, "Resource scheduled for deletion")
    generation, found = _int64(obj, "metadata", "generation")
    if found:
        observed, seen = _int64(obj, "status", "observedGeneration")
        if seen and observed != generation:
            return Result(IN_PROGRESS, f"{obj.get('kind')} generation is {generation}, but latest observed "
                                       f"generation is {observed}")
    conditions = _conditions(obj)
    for cond in conditions:
        if cond.get("type") == "Reconciling" and cond.get("status") == "True":
            return Result(IN_PROGRESS, str(cond.get("message") or ""))
        if cond.get("type") == "Stalled" and cond.get("status") == "True":
            return Result(FAILED, str(cond.get("message") or ""))
    for cond in conditions:
        if cond.get("type") != "Ready":
            continue
        if cond.get("status") == "True":
            return Result(CURRENT, "Resource is Ready")
        if cond.get("status") in ("False", "Unknown"):
            return Result(IN_PROGRESS, str(cond.get("message") or ""))
    return Result(CURRENT, "Resource is current")
