#!/usr/bin/env bash
# The NIF (c_src/sidecar_nif.c) under AddressSanitizer in a real VM: builds the bridge into a
# private build directory with -fsanitize=address, preloads libasan into the VM (not into the
# workers) and runs bench/nif_asan.exs. Any ASan error aborts the VM (exit != 0). LeakSanitizer is
# off: the BEAM's own allocations at exit would drown ours, and the NIF allocates with enif_alloc
# (invisible to it); instead the script checks that no mapping of the run is left once collected.
# Usage: cd bridge && bench/nif_asan.sh        (SIDECAR_PYTHON: the workers' python)
set -euo pipefail
cd "$(dirname "$0")/.."
LIBASAN=$(gcc -print-file-name=libasan.so)
[ -e "$LIBASAN" ] || { echo "libasan not found (gcc -print-file-name=libasan.so)"; exit 2; }
export MIX_BUILD_PATH=${MIX_BUILD_PATH:-/tmp/sidecar-bridge-asan-build}
export SIDECAR_NATIVE_CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g -O1"
export SIDECAR_PYTHON=${SIDECAR_PYTHON:-$PWD/../.venv/bin/python}
export MIX_ENV=test
# The compiler loads Sidecar.Native; without the ASan runtime that load would abort: skip it there.
SIDECAR_NIF=0 mix compile
LD_PRELOAD=$LIBASAN ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1 mix run bench/nif_asan.exs
