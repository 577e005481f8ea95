#!/usr/bin/env bash
# The project's test command: installs everything from nothing, then the static checks, then every test.
# Extra arguments go to pytest (e.g. scripts/test.sh tests/test_arena.py -x).
# A lint, dead-code or type error fails the command before any test runs (config: pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# ruff only checks here (never `ruff --fix` on sidecar/v1: generated code, excluded in the config).
.venv/bin/ruff check sidecar tests benchmarks scripts setup.py
.venv/bin/vulture            # sidecar/ + scripts/vulture_whitelist.py ([tool.vulture])
.venv/bin/mypy               # --strict on sidecar/ ([tool.mypy])
# The C modules' stubs (sidecar/_native.pyi, _cudaipc.pyi) against the built extensions.
.venv/bin/python -m mypy.stubtest sidecar._native sidecar._cudaipc --allowlist scripts/stubtest_allowlist.txt
.venv/bin/python -m pytest "$@"
