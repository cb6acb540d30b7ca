"""A shard's Lease (coordination.k8s.io/v1): a process acts on a shard only while it holds it.

    acquire (standby: wait) → keep (renew every retry; exit past the renew deadline) → release

The rules that decide are in ``sharding``; this module reads and writes the Leases. Every write
carries the resourceVersion it read, so two processes never both win one Lease. A holder that
cannot renew for the renew deadline ends its process at once: the deadline is shorter than the
Lease's duration, so it is gone before a standby may take over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

from privatefm_operator import metrics, naming
from privatefm_operator.kube import Kube, is_conflict
from privatefm_operator.sharding import LeaseObserver, LeaseRecord, Shard

SHARDS_ANNOTATION = f"{naming.GROUP}/shards"
LEASE_LABELS = {naming.LABEL_MANAGED_BY: naming.MANAGED_BY, naming.LABEL_COMPONENT: "shard-lease"}
SELECTOR = ",".join(f"{k}={v}" for k, v in LEASE_LABELS.items())
log = logging.getLogger("privatefm.operator")


def micro_time() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record_of(lease: dict[str, Any]) -> LeaseRecord:
    meta, spec = lease["metadata"], lease.get("spec") or {}
    raw = (meta.get("annotations") or {}).get(SHARDS_ANNOTATION, "")
    return LeaseRecord(name=meta["name"], holder=spec.get("holderIdentity") or "",
                       shards=int(raw) if raw.isdigit() else None, resource_version=meta["resourceVersion"],
                       duration=float(spec.get("leaseDurationSeconds") or 0),
                       transitions=int(spec.get("leaseTransitions") or 0))


class ShardLease:
    def __init__(self, kube: Kube, namespace: str, shard: Shard, identity: str, *, duration: float,
                 renew_deadline: float, retry: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.kube, self.namespace, self.shard, self.identity = kube, namespace, shard, identity
        self.duration, self.renew_deadline, self.retry, self.clock = duration, renew_deadline, retry, clock
        self.observer = LeaseObserver()
        self._renewed = 0.0
        self._version = ""  # the resourceVersion of this process's last write of its Lease
        self._stop = threading.Event()

    # ---- acquire ---------------------------------------------------------------------------
    def acquire(self, stop: threading.Event) -> bool:
        """Waits until this process holds its shard's Lease (True), or ``stop`` is set (False)."""
        said = ""
        while not stop.is_set():
            try:
                waiting = self.try_acquire()
            except ApiException as err:
                waiting = f"the API server answered {err.status} {err.reason}"
            if not waiting:
                metrics.SHARD_HELD.labels(str(self.shard.index)).set(1)
                log.info("holding shard %d of %d", self.shard.index, self.shard.count,
                         extra={"fields": {"lease": self.shard.lease, "identity": self.identity}})
                return True
            if waiting != said:
                log.info("standing by: %s", waiting)
                said = waiting
            stop.wait(self.retry)
        return False

    def try_acquire(self) -> str:
        """One try: '' once held, else why this process waits."""
        now = self.clock()
        records = [record_of(lease) for lease in self.kube.list("Lease", self.namespace, SELECTOR)]
        for record in records:
            self.observer.observe(record, now)
        others = self.observer.other_counts(records, self.shard.count, now)
        if others:
            return (f"Lease {others[0].name} is held by {others[0].holder} with {others[0].shards} shards, and this "
                    f"process runs with {self.shard.count}: the old split runs until its last holder is gone")
        mine = next((r for r in records if r.name == self.shard.lease), None)
        if not self.observer.may_take(mine, self.identity, now):
            assert mine is not None
            return f"shard {self.shard.index} is held by {mine.holder}"
        try:
            if mine is None:
                created = self.kube.create(self._lease(transitions=0))
                if created is None:
                    return "another process created the Lease first"
                self._version = created["metadata"]["resourceVersion"]
            else:
                self._write(mine.resource_version, transitions=mine.transitions + (mine.holder != self.identity))
        except ApiException as err:
            if is_conflict(err):
                return "another process wrote the Lease first"
            raise
        self._renewed = self.clock()
        return ""

    # ---- keep ------------------------------------------------------------------------------
    def keep(self, lost: Callable[[str], None]) -> threading.Thread:
        """Renews the Lease every ``retry`` seconds in a thread; calls ``lost`` (which must end the
        process) when another holds it, or when no renewal succeeded for the renew deadline."""
        def run() -> None:
            while not self._stop.wait(self.retry):
                try:
                    try:  # one request: the write carries the version this process last wrote
                        self._write(self._version)
                    except ApiException as err:
                        if err.status not in (404, 409):
                            raise
                        # Written (or deleted) by someone else since: whose is it now?
                        lease = self.kube.get("Lease", self.shard.lease, self.namespace)
                        holder = ((lease or {}).get("spec") or {}).get("holderIdentity")
                        if lease is None or holder != self.identity:
                            return lost(f"the Lease {self.shard.lease} is now held by {holder!r}")
                        self._write(lease["metadata"]["resourceVersion"])
                    self._renewed = self.clock()
                except Exception as err:  # any failure to renew counts against the deadline
                    log.warning("could not renew the Lease %s: %s", self.shard.lease, err)
                if self.clock() - self._renewed > self.renew_deadline:
                    return lost(f"the Lease {self.shard.lease} was not renewed for {self.renew_deadline:g} s")
        thread = threading.Thread(target=run, name="lease", daemon=True)
        thread.start()
        return thread

    def release(self) -> None:
        """On a clean stop: frees the Lease at once, so a standby need not wait out its duration."""
        self._stop.set()
        metrics.SHARD_HELD.labels(str(self.shard.index)).set(0)
        try:
            lease = self.kube.get("Lease", self.shard.lease, self.namespace)
            if lease is not None and (lease.get("spec") or {}).get("holderIdentity") == self.identity:
                self.kube.patch("Lease", self.shard.lease, {
                    "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                    "spec": {"holderIdentity": None}}, self.namespace)
        except ApiException as err:
            log.warning("could not release the Lease %s: %s", self.shard.lease, err.reason)

    # ---- writes ----------------------------------------------------------------------------
    def _lease(self, transitions: int) -> dict[str, Any]:
        now = micro_time()
        return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.shard.lease, "namespace": self.namespace, "labels": LEASE_LABELS,
                             "annotations": {SHARDS_ANNOTATION: str(self.shard.count)}},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.duration),
                         "acquireTime": now, "renewTime": now, "leaseTransitions": transitions}}

    def _write(self, resource_version: str, transitions: int | None = None) -> None:
        """Renews; with ``transitions``, takes the Lease (a new holder, or this one after a restart)."""
        spec: dict[str, Any] = {"holderIdentity": self.identity, "leaseDurationSeconds": int(self.duration),
                                "renewTime": micro_time()}
        if transitions is not None:
            spec["acquireTime"] = spec["renewTime"]
            spec["leaseTransitions"] = transitions
        written = self.kube.patch("Lease", self.shard.lease, {
            "metadata": {"resourceVersion": resource_version, "labels": LEASE_LABELS,
                         "annotations": {SHARDS_ANNOTATION: str(self.shard.count)}},
            "spec": spec}, self.namespace)
        self._version = written["metadata"]["resourceVersion"]
