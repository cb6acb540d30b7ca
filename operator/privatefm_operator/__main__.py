"""``privatefm-operator`` / ``python -m privatefm_operator``: run the operator cluster-wide."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
import time

import kopf
from kopf._cogs.clients.errors import APINotFoundError  # not exported by kopf; pinned by the lock

from privatefm_operator import handlers, logs

log = logging.getLogger("privatefm.operator")


def main() -> int:
    logs.configure()
    assert handlers.SETTINGS  # importing handlers registers them with kopf
    # One active operator at a time comes from the Deployment (Recreate, 1 replica), so no peering.
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
