#!/usr/bin/env bash
# Sets up everything the tests and the demo need on a fresh Debian machine:
#   apt packages (etcd-server, openssl; for the real node: containerd, runc,
#   containernetworking-plugins, iptables, nftables, buildah, mmdebstrap), the pinned Go builds
#   (scripts/build-tools.sh, cached under ~/.cache/privatefm), the wheelhouse
#   (~/.cache/privatefm/wheels: every wheel locks/dev.lock pins, hash-checked, downloaded once and used by both
#   the venv and the image builds) and the Python environment (.venv, installed by uv from locks/dev.lock): the
#   product editable with its merge, test and dev extras, and the test harness (tests/support,
#   package privatefm-testing), which only this test setup installs.
# Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { echo "[setup] $*" >&2; }

need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
python3 -c "import venv, ensurepip" 2>/dev/null || need_apt+=(python3-venv)
# The node (privatefm_testing.node) and its image builds (privatefm_testing.images).
for pkg in containerd runc containernetworking-plugins iptables nftables buildah mmdebstrap; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  log "apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  # Debian starts an etcd service on install; ours run on private ports with their own data dirs.
  systemctl disable --now etcd >/dev/null 2>&1 || pkill -x etcd 2>/dev/null || true
fi

command -v go >/dev/null || { log "Go is required (go 1.24 or newer)"; exit 1; }

# Python: uv (itself pinned by hash, locks/uv.lock), the wheelhouse and the venv. Every wheel is
# checked against the sha256 in locks/dev.lock: once when pip downloads it into the wheelhouse
# (--require-hashes), and again when uv installs it into .venv, offline, from that wheelhouse. The
# image builds install from the same wheelhouse (privatefm_testing.images).
python_env() {
  local wheels="${PRIVATEFM_CACHE:-$HOME/.cache/privatefm}/wheels" lock_hash uv stamp want
  lock_hash="$(sha256sum locks/dev.lock | cut -d' ' -f1)"
  if [[ "$(cat "$wheels/.lock-sha256" 2>/dev/null)" != "$lock_hash" ]]; then
    log "downloading the pinned wheels into $wheels (beside the Go builds)"
    mkdir -p "$wheels"
    python3 -m pip download -q --disable-pip-version-check --progress-bar off --no-deps --require-hashes \
      -d "$wheels" -r locks/dev.lock
    echo "$lock_hash" > "$wheels/.lock-sha256"
  fi
  uv="$(bash scripts/uv.sh)"
  stamp=".venv/.privatefm-stamp"
  want="$(cat locks/dev.lock pyproject.toml tests/support/pyproject.toml | sha256sum | cut -d' ' -f1)"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    log "creating the Python environment (.venv)"
    [[ -x .venv/bin/python ]] || python3 -m venv .venv
    local offline=(--python .venv/bin/python --offline --no-index --find-links "$wheels" --quiet)
    # Exactly the lock (anything else in .venv is removed), then the two local packages on top.
    "$uv" pip sync "${offline[@]}" --require-hashes locks/dev.lock
    "$uv" pip install "${offline[@]}" --no-deps -e . -e tests/support
    echo "$want" > "$stamp"
  fi
  # The node's images, ahead of the node (CI sets this; privatefm_testing.images): building them
  # mostly waits on the disk, which the Go builds hardly use. Go's caches grow to about 12 GB
  # meanwhile, so a build that would leave less free is left to the node.
  if [[ "${PRIVATEFM_PREBUILD_IMAGES:-0}" == 1 ]]; then
    log "building and exporting the node's images (beside the Go builds)"
    .venv/bin/privatefm-cluster images --reserve-gib 14
  fi
}

# The downloads and image builds wait on the network and the disk, the Go builds on the CPU: on a
# cold machine they run side by side.
python_env &
python_lane=$!
trap 'pkill -P "$python_lane" 2>/dev/null; kill "$python_lane" 2>/dev/null || true' EXIT  # a failed Go build stops it
bash scripts/build-tools.sh >/dev/null
wait "$python_lane" || { log "the Python environment or the images failed"; exit 1; }
trap - EXIT
log "ready: tools in ${PRIVATEFM_CACHE:-$HOME/.cache/privatefm}/bin, Python in .venv"
