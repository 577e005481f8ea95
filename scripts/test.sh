#!/usr/bin/env bash
# The project's test command: installs everything from nothing, then runs every test.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/test_arena.py -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/python -m pytest "$@"
