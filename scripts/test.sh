#!/usr/bin/env bash
# Sets everything up, then runs the checks and the whole test suite against a real local
# control plane and S3 server:  ruff, mypy, the CRD freshness check, pytest.
# Extra arguments go to pytest (e.g. scripts/test.sh -k merge, or --cluster=kind).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff";  ruff check .
echo "== mypy";  mypy
echo "== crds";  privatefm-crdgen --check
echo "== pytest"
exec pytest "$@"
