#!/usr/bin/env bash
# Prints the path of uv $UV_VERSION, installing it first (into ~/.cache/privatefm/uv-<version>,
# from the package index, checked against the hashes in locks/uv.lock) when it is missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/versions.env
dir="${PRIVATEFM_CACHE:-$HOME/.cache/privatefm}/uv-$UV_VERSION"
if [[ ! -x "$dir/bin/uv" ]]; then
  echo "[setup] installing uv $UV_VERSION into $dir" >&2
  rm -rf "$dir"
  python3 -m venv "$dir"
  "$dir/bin/pip" install -q --disable-pip-version-check --progress-bar off --require-hashes -r locks/uv.lock >&2
fi
echo "$dir/bin/uv"
