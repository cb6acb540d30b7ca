"""kstatus-compatible conditions, as typed ``api.Condition`` models. Pure functions.

``lastTransitionTime`` changes only when a condition's status changes.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from privatefm_operator.api import Condition, ConditionStatus

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
DEGRADED = "Degraded"
RECOVERING = "Recovering"
STORE_AVAILABLE = "StoreAvailable"
CHECKPOINT_TRUSTED = "CheckpointTrusted"
SCOPED_STORE_CREDENTIALS = "ScopedStoreCredentials"


def condition(type_: str, status: bool, reason: str, message: str, generation: int | None,
              at: datetime) -> Condition:
    return Condition(type=type_, status=ConditionStatus.TRUE if status else ConditionStatus.FALSE, reason=reason,
                     message=message, observed_generation=generation, last_transition_time=at)


def merge(old: Iterable[Condition], new: Iterable[Condition]) -> list[Condition]:
    """The ``new`` conditions, each keeping its old ``lastTransitionTime`` when its status is unchanged.

    Conditions in ``old`` whose type is not in ``new`` are kept as they were.
    """
    previous = {c.type: c for c in old}
    result = []
    for cond in new:
        before = previous.pop(cond.type, None)
        if before is not None and before.status == cond.status:
            cond = cond.model_copy(update={"last_transition_time": before.last_transition_time})
        result.append(cond)
    return result + list(previous.values())


def find(conditions: Iterable[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def kstatus(generation: int | None, at: datetime, *, ready: bool, reconciling: bool, stalled: bool, reason: str,
            message: str) -> list[Condition]:
    """The three kstatus conditions for one observation."""
    return [
        condition(READY, ready, reason, message, generation, at),
        condition(RECONCILING, reconciling, reason if reconciling else "Idle", message if reconciling else "",
                  generation, at),
        condition(STALLED, stalled, reason if stalled else "Progressing", message if stalled else "", generation, at),
    ]
