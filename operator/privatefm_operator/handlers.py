"""kopf wiring only: each handler hands the object to the service layer.

LearnerNamespaces are reconciled on resume, on spec change and on a timer (drift repair).
AdapterMerges are looked at on resume and create; their Jobs' events drive them afterwards.
No timer watches AdapterMerges, so they carry no kopf finalizer and never block namespace deletion.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from privatefm_operator import metrics, naming
from privatefm_operator.api import GROUP, VERSION, MergeTrigger
from privatefm_operator.kube import Kube
from privatefm_operator.service import Operator, RetryLater, timed
from privatefm_operator.settings import Settings
from privatefm_operator.storage import Storage

SETTINGS = Settings()
LNS = (GROUP, VERSION, "learnernamespaces")
AM = (GROUP, VERSION, "adaptermerges")
OURS = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY}
_state: dict[str, Any] = {}


def operator() -> Operator:
    op: Operator = _state["operator"]
    return op


def _run(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except RetryLater as err:
        raise kopf.TemporaryError(str(err), delay=err.delay) from err


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf.progress")
    settings.persistence.finalizer = f"{GROUP}/operator"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.execution.max_workers = 8
    _state["operator"] = Operator(Kube(), Storage(SETTINGS), SETTINGS)
    metrics.init_labels(t.value for t in MergeTrigger)
    _state["http"] = metrics.start_http_server(SETTINGS.http_port, ready=lambda: "operator" in _state)


@kopf.on.cleanup()
def cleanup(**_: Any) -> None:
    if "http" in _state:
        _state.pop("http").shutdown()


@kopf.on.resume(*LNS)
@kopf.on.create(*LNS)
@kopf.on.update(*LNS, field="spec")
@timed("learnernamespace")
def learner_changed(name: str, **_: Any) -> None:
    _run(operator().reconcile_learner, name)


@kopf.timer(*LNS, interval=SETTINGS.resync_seconds, initial_delay=SETTINGS.resync_seconds)
@timed("learnernamespace")
def learner_resync(name: str, **_: Any) -> None:
    _run(operator().reconcile_learner, name)


@kopf.on.delete(*LNS, optional=True)
def learner_deleted(name: str, **_: Any) -> None:
    operator().forget_learner(name)


@kopf.on.resume(*AM)
@kopf.on.create(*AM)
@timed("adaptermerge")
def merge_requested(name: str, namespace: str, **_: Any) -> None:
    _run(operator().sync_merge, namespace, name)


@kopf.on.event("batch", "v1", "jobs", labels=OURS)
@timed("job")
def job_event(body: kopf.Body, type: str | None, **_: Any) -> None:
    if type == "DELETED":
        return
    try:
        operator().on_job(dict(body))
    except RetryLater as err:
        logging.getLogger("privatefm.operator").warning("job event deferred: %s", err)
