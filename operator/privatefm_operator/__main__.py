"""``privatefm-operator`` / ``python -m privatefm_operator``: run the operator cluster-wide."""

from __future__ import annotations

import asyncio
import socket
import sys

import kopf

from privatefm_operator import handlers, logs


def main() -> int:
    logs.configure()
    assert handlers.SETTINGS  # importing handlers registers them with kopf
    # One active operator at a time comes from the Deployment (Recreate, 1 replica), so no peering.
    while True:
        handlers.RESTART.clear()
        # An explicit identity: kopf's default asks the password database for the user, and the image's
        # uid 65532 has no entry there (getpwuid fails and the operator would crash at start).
        asyncio.run(kopf.operator(clusterwide=True, standalone=True, stop_flag=handlers.RESTART,
                                  liveness_endpoint=handlers.LIVENESS_URL,
                                  identity=socket.gethostname()))  # type: ignore[arg-type]  # kopf's NewType
        if not handlers.RESTART.is_set():  # stopped by a signal
            return 0


if __name__ == "__main__":
    sys.exit(main())
