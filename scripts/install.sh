#!/usr/bin/env bash
# Creates .venv (if missing) and installs the package with its C extension and the test tools.
# torch==2.13.0 goes in first: on our machines any other spec pulls several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q --no-build-isolation -e '.[test]'
.venv/bin/python -c 'import sidecar._native' # the extension must have been built

# The Elixir bridge's tests need a BEAM (Debian's elixir: Elixir 1.14 / OTP 25); no hex packages are used.
if ! command -v elixir >/dev/null 2>&1 && [ "${SIDECAR_SKIP_ELIXIR_INSTALL:-0}" != 1 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq elixir >/dev/null
  else
    echo "install.sh: elixir is missing; install Debian's 'elixir' package for the bridge tests" >&2
  fi
fi

# The dashboard test drives a real headless Chromium (Debian's chromium + chromium-driver, through
# selenium from the test extra); the test skips, saying why, only where they cannot be installed.
if { ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; } \
    && [ "${SIDECAR_SKIP_CHROMIUM_INSTALL:-0}" != 1 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "install.sh: chromium/chromedriver are missing; install Debian's 'chromium' and 'chromium-driver'" \
         "for the dashboard test" >&2
  fi
fi

# The bridge's NIF (bridge/c_src) needs erl_nif.h (Debian: erlang-dev); without it the bridge still
# builds and runs on its file I/O path, but the zero-copy tests need it.
if command -v erl >/dev/null 2>&1 && [ "${SIDECAR_SKIP_ELIXIR_INSTALL:-0}" != 1 ] && \
   [ ! -f "$(erl -noshell -eval 'io:format("~s", [code:root_dir()]), halt().')/usr/include/erl_nif.h" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq erlang-dev >/dev/null ||
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq erlang-dev >/dev/null; }
  else
    echo "install.sh: erl_nif.h is missing; install Debian's 'erlang-dev' package for the bridge's NIF" >&2
  fi
fi
