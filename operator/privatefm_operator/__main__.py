"""``privatefm-operator`` / ``python -m privatefm_operator``: run the operator cluster-wide, or
one shard of it (``sharding``): with a Lease namespace set, the process first waits to hold its
shard's Lease (a standby waits here, answering its probes), and ends itself if it loses it."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid

import kopf
from kopf._cogs.clients.errors import APINotFoundError  # not exported by kopf; pinned by the lock

from privatefm_operator import handlers, logs, metrics
from privatefm_operator.kube import Kube
from privatefm_operator.leases import ShardLease

log = logging.getLogger("privatefm.operator")


def main() -> int:
    logs.configure()
    settings, shard = handlers.SETTINGS, handlers.SHARD  # importing handlers registers them with kopf
    lease = None
    if settings.lease_namespace:
        # Unique per process, as client-go's: a restarted container waits out its own old Lease.
        identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        lease = ShardLease(Kube(), settings.lease_namespace, shard, identity,
                           duration=settings.lease_duration_seconds,
                           renew_deadline=settings.lease_renew_deadline_seconds, retry=settings.lease_retry_seconds)
        if not _stand_by(lease):
            return 0
        lease.keep(lost=_lost)
    try:
        return _run_kopf()
    finally:
        if lease is not None:
            lease.release()


def _stand_by(lease: ShardLease) -> bool:
    """Waits for the shard's Lease, serving /healthz and /readyz meanwhile (a standby is healthy);
    False when stopped by a signal first."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    metrics.SHARD_HELD.labels(str(lease.shard.index)).set(0)
    server = metrics.start_http_server(handlers.SETTINGS.http_port, ready=lambda: True,
                                       alive=lambda: (True, b"standing by for the shard's Lease\n"))
    try:
        return lease.acquire(stop)
    finally:
        server.shutdown()
        server.server_close()  # kopf's start-up serves the same port
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _lost(why: str) -> None:
    """Ends the process at once: the renew deadline is shorter than the Lease's duration, so it is
    gone before any standby may act on its learners. Its pod restarts and stands by."""
    log.critical("lost the shard's Lease (%s): exiting", why)
    logging.shutdown()
    os._exit(3)


def _run_kopf() -> int:
    while True:
        handlers.RESTART.clear()
        # An explicit identity: kopf's default asks the password database for the user, and the image's
        # uid 65532 has no entry there (getpwuid fails and the operator would crash at start).
        try:
            asyncio.run(kopf.operator(clusterwide=True, standalone=True, stop_flag=handlers.RESTART,
                                      liveness_endpoint=handlers.LIVENESS_URL,
                                      identity=socket.gethostname()))  # type: ignore[arg-type]  # kopf's NewType
        except APINotFoundError:
            # A watch on a CRD that was just deleted or re-created answers 404, and kopf raises it out
            # of operator() (seen in CI while the loop stopped for a restart). That ends this loop,
            # not the process: start again, and discovery starts over.
            log.warning("a watched resource vanished (404); starting the operator loop again", exc_info=True)
            time.sleep(1)
            continue
        if not handlers.RESTART.is_set():  # stopped by a signal
            return 0


if __name__ == "__main__":
    sys.exit(main())
