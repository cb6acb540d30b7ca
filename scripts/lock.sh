#!/usr/bin/env bash
# Regenerates the hash-pinned locks under locks/ with uv. Run it after changing a dependency in
# pyproject.toml or tests/support/pyproject.toml, and commit what it writes.
#
#   locks/dev.lock       everything scripts/setup.sh installs into .venv: the product with its
#                        merge, test and dev extras, and the test harness's own dependencies
#   locks/operator.lock  the operator image: the product's default dependencies only (no torch)
#   locks/merge.lock     the merge image: exactly the `merge` extra (no kopf, peft, transformers)
#   locks/uv.lock        uv itself, which scripts/setup.sh installs before anything else
#
# Every lock is universal (markers instead of one platform's choices) and carries the sha256 of
# every distribution the index offers for each pin, so linux/amd64 and linux/arm64 images, and any
# developer machine, install from them with --require-hashes. The image locks are resolved with
# dev.lock as constraints, so all of them pin the same versions (tests/test_packaging.py checks).
#
# These are uv's pip-compatible lock files, not a project `uv.lock`: that format records the
# index's URL in every entry, and this repository names no package registry.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/versions.env
UV="${UV:-$(bash scripts/uv.sh)}"
export UV_NATIVE_TLS=1  # the system trust store, so a proxy with its own CA works

compile() {  # output inputs...
  local out="$1"; shift
  "$UV" pip compile --quiet --universal --generate-hashes --python-version 3.11 --no-header \
    --annotation-style line --output-file "$out" "$@"
}
compile locks/dev.lock pyproject.toml tests/support/pyproject.toml --extra merge --extra test --extra dev
compile locks/operator.lock pyproject.toml -c locks/dev.lock
merge_in="$(mktemp)"; trap 'rm -f "$merge_in"' EXIT
python3 -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['merge'], sep='\n')" > "$merge_in"
compile locks/merge.lock "$merge_in" -c locks/dev.lock
sed -i "s|$merge_in|pyproject.toml (the merge extra)|" locks/merge.lock
echo "uv==$UV_VERSION" | compile locks/uv.lock -
