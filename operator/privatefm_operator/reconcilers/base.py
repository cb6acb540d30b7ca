"""What every reconciler shares: the clients, the retry signals, the one optimistic-concurrency
loop, and the one status write."""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from pydantic import ValidationError

from privatefm_operator import metrics, naming
from privatefm_operator.api import Resource, Status
from privatefm_operator.kube import Kube, is_conflict
from privatefm_operator.settings import Settings
from privatefm_operator.storage import Storage

log = logging.getLogger("privatefm.operator")
T = TypeVar("T")
R = TypeVar("R", bound=Resource)
S = TypeVar("S", bound=Status)


@dataclass(frozen=True)
class Clients:
    kube: Kube
    storage: Storage
    settings: Settings


class RetryLater(Exception):
    """Something outside our control is not ready yet; the handler retries after ``delay``."""

    def __init__(self, message: str, delay: float = 5.0) -> None:
        super().__init__(message)
        self.delay = delay


class Stale(Exception):
    """What this reconcile read is out of date: start again from a fresh read."""


class Step(Enum):
    CONTINUE = "continue"  # go on with the next phase
    DONE = "done"          # write status and stop
    REQUEUE = "requeue"    # write status, then reconcile again from what was written
    SKIP = "skip"          # nothing to do and nothing to write


@dataclass(frozen=True)
class Invalid:
    """A body that does not parse into its model. The reconciler reports it; it never acts on it."""

    body: Mapping[str, Any]
    error: str

    @property
    def metadata(self) -> dict[str, Any]:
        return dict(self.body["metadata"])

    def ref(self) -> dict[str, Any]:
        return {"apiVersion": self.body.get("apiVersion"), "kind": self.body.get("kind"), "metadata": self.metadata}


def parse(model: type[R], body: Mapping[str, Any]) -> R | Invalid:
    """The handlers' one way to turn what kopf delivered into a model."""
    try:
        return model.model_validate(dict(body))
    except ValidationError as err:
        return Invalid(body, str(err))


def status_of(obj: Resource | Invalid, model: type[S]) -> S:
    """The object's status as its model (empty when there is none, or when it does not parse)."""
    raw = obj.body.get("status") if isinstance(obj, Invalid) else getattr(obj, "status", None)
    if isinstance(raw, model):
        return raw
    try:
        return model.model_validate(raw or {})
    except ValidationError:
        return model()


def retry_on_conflict(attempt: Callable[[int], T], tries: int = 20) -> T:
    """Runs ``attempt(0)``, ``attempt(1)``, … until one neither hits a 409 nor finds what it read
    stale. Every attempt after the first must start from a fresh read. The operator's one
    optimistic-concurrency loop."""
    for n in range(tries):
        try:
            return attempt(n)
        except Stale:
            continue
        except Exception as err:
            if not is_conflict(err):
                raise
    raise RetryLater("too many concurrent updates", delay=1)


def write_status(kube: Kube, kind: str, metadata: Mapping[str, Any], old: Status | None, new: Status, *,
                 observed: bool) -> dict[str, Any] | None:
    """The one status write. ``observed`` stamps ``observedGeneration`` (the reconcile of that
    generation is complete); nothing is written when the status would not change (returns None).
    It is a merge patch guarded by the resourceVersion that was read, so a write based on stale
    data fails with 409 instead of undoing someone else's."""
    if observed:
        new = new.model_copy(update={"observed_generation": metadata.get("generation")})
    if new == old:
        return None
    return kube.patch(kind, metadata["name"], {"metadata": {"resourceVersion": metadata["resourceVersion"]},
                                               "status": merge_patch(old.wire() if old else {}, new.wire())},
                      metadata.get("namespace"), subresource="status")


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``: changed keys, and null for
    each key ``new`` no longer has (a cleared field must be sent as null, or it stays)."""
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            nested = merge_patch(before, value)
            if nested:
                patch[key] = nested
        elif value != before:
            patch[key] = value
    return patch


def labels_of(obj: Mapping[str, Any] | None) -> dict[str, str]:
    """An object's labels ({} for none, or no object)."""
    return dict(((obj or {}).get("metadata") or {}).get("labels") or {})


def termination_message(kube: Kube, namespace: str, job: str) -> str | None:
    """The newest termination message among Job ``job``'s pods (a merge or verify result), if any."""
    pods = kube.list("Pod", namespace, selector=f"{naming.JOB_NAME_LABEL}={job}")
    for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", ""), reverse=True):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            terminated = (cs.get("state") or {}).get("terminated")
            if terminated and terminated.get("message"):
                return str(terminated["message"])
    return None


def distrust(kube: Kube, ref: dict[str, Any], reason: str, message: str) -> None:
    """Something claims an identity it does not have: ignored, never acted on, and made visible
    (a Warning Event on it and ``privatefm_untrusted_objects_total``)."""
    metrics.UNTRUSTED.labels(kind=str(ref.get("kind")), reason=reason).inc()
    kube.event(ref, "Warning", reason, message)
    log.warning("untrusted %s %s/%s (%s): %s", ref.get("kind"), ref["metadata"].get("namespace"),
                ref["metadata"].get("name"), reason, message)


class Locks:
    """One lock per object: kopf runs handlers of different objects (and kinds) concurrently, and
    an AdapterMerge is reached from its own events, its Job's and the learner's sweep."""

    def __init__(self) -> None:
        self._locks: defaultdict[tuple[str, str], threading.Lock] = defaultdict(threading.Lock)
        self._guard = threading.Lock()

    def __call__(self, namespace: str | None, name: str) -> threading.Lock:
        with self._guard:
            return self._locks[(namespace or "", name)]
