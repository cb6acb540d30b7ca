"""``privatefm-operator`` / ``python -m privatefm_operator``: run the operator cluster-wide."""

from __future__ import annotations

import asyncio
import sys

import kopf

from privatefm_operator import handlers, logs


def main() -> int:
    logs.configure()
    assert handlers.SETTINGS  # importing handlers registers them with kopf
    # One active operator at a time comes from the Deployment (Recreate, 1 replica), so no peering.
    while True:
        handlers.RESTART.clear()
        asyncio.run(kopf.operator(clusterwide=True, standalone=True, stop_flag=handlers.RESTART,
                                  liveness_endpoint=handlers.LIVENESS_URL))
        if not handlers.RESTART.is_set():  # stopped by a signal
            return 0


if __name__ == "__main__":
    sys.exit(main())
