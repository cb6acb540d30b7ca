#!/usr/bin/env bash
# The main job on a fresh machine: set everything up, start a local control plane and S3,
# run the operator on a sample learner and merge a small model; shows the verified checkpoint.
# Pass --keep to leave it running until Ctrl-C.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# The node's images are built beside the Go builds, unless only the quick lane runs.
case " $* " in *" --pods=process "* | *" --pods process "*) ;; *) export PRIVATEFM_PREBUILD_IMAGES=1 ;; esac
bash scripts/setup.sh
exec .venv/bin/python -m privatefm_testing.demo "$@"
