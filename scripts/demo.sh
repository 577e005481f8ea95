#!/usr/bin/env bash
# The product's main job on defaults: a pool of sidecars, tensors both ways by shared memory, ops,
# a structured error, hardware and timing, and a worker crash absorbed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m sidecar.demo "$@"
