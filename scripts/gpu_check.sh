#!/usr/bin/env bash
# The one GPU check: CUDA IPC tests and benchmark on a machine with an NVIDIA GPU.
#
#   scripts/gpu_check.sh prepare   HERE (a machine with network): puts what the GPU machine lacks into
#                                  .gpu_carry/ (ignored by git): Python wheels of the gRPC/protobuf
#                                  packages at the versions of .venv, and a cp312 build of the C
#                                  extensions as a fallback. Re-run it after native/*.c changes.
#   scripts/gpu_check.sh           ON THE GPU MACHINE, in the repo root, with .gpu_carry carried along:
#                                  installs the wheels into /tmp/site, builds the extensions in place
#                                  (or takes the prebuilt ones), prints the GPU, runs tests/gpu and
#                                  benchmarks/bench_cuda_ipc.py. Every step is time-boxed; the whole
#                                  script ends within GPU_CHECK_BUDGET_S (default 190 s). Logs, JUnit
#                                  XML and the benchmark's JSON go to $OUT (or /tmp/gpu-check-out).
#
# It uses the GPU machine's own python3 (the one that holds a CUDA torch); nothing is fetched there.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CARRY=.gpu_carry

prepare() {
    set -e
    local py=.venv/bin/python
    mkdir -p "$CARRY/wheels" "$CARRY/prebuilt"
    if [ -d .git/info ] && ! grep -qx "/$CARRY/" .git/info/exclude 2>/dev/null; then
        echo "/$CARRY/" >> .git/info/exclude
    fi
    rm -f "$CARRY"/wheels/*.whl
    local pkgs=()
    for p in protobuf grpcio grpcio-status grpcio-health-checking grpcio-reflection googleapis-common-protos; do
        pkgs+=("$p==$($py -c "import importlib.metadata as m; print(m.version('$p'))")")
    done
    echo "downloading ${pkgs[*]} for CPython 3.12 / manylinux x86_64"
    $py -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CARRY/wheels" "${pkgs[@]}"
    local py312=${PY312:-$(command -v python3.12 || true)}
    if [ -n "$py312" ]; then
        local inc suffix
        inc=$("$py312" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
        suffix=$("$py312" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
        rm -f "$CARRY"/prebuilt/*.so
        for pair in "_native:native/shm.c" "_cudaipc:native/cuda_ipc.c"; do
            gcc -shared -fPIC -O2 -std=gnu11 -Wall -Wextra -I"$inc" "${pair#*:}" \
                -o "$CARRY/prebuilt/${pair%%:*}$suffix" -lrt -ldl
        done
    else
        echo "no python3.12 here: no prebuilt extensions (the GPU machine must compile them itself)"
    fi
    du -sh "$CARRY"; ls -l "$CARRY"/wheels "$CARRY"/prebuilt
    echo "carry '$CARRY' when running scripts/gpu_check.sh on the GPU machine"
}

if [ "${1:-}" = "prepare" ]; then
    prepare
    exit $?
fi

# ----------------------------------------------------------------------------------------------------
# on the GPU machine

OUT=${OUT:-/tmp/gpu-check-out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-190}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
declare -a SUMMARY=()

say() { echo "$*" | tee -a "$LOG"; }

# step NAME LIMIT_S CMD...: runs CMD with a timeout no later than the overall budget allows.
step() {
    local name=$1 limit=$2
    shift 2
    local now left t0 rc
    now=$(date +%s)
    left=$(( START + BUDGET - now ))
    if [ "$left" -lt 15 ]; then
        say "=== $name: SKIPPED (budget spent)"
        SUMMARY+=("$name: skipped (budget)")
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    say "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
    t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - t0 ))
    [ "$rc" -eq 124 ] && say "=== $name: TIMED OUT after ${limit}s"
    say "=== $name: rc=$rc in ${took}s"
    SUMMARY+=("$name: rc=$rc ${took}s")
    return "$rc"
}

env_info() {
    nvidia-smi --query-gpu=name,uuid,memory.total,driver_version --format=csv || nvidia-smi || true
    echo "python: $(command -v "$PY") $("$PY" -V 2>&1)"
    "$PY" - <<'EOF'
import importlib.metadata as m
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count())
for p in ("protobuf", "grpcio", "grpcio-status", "numpy", "pyarrow", "psutil", "nvidia-ml-py", "pytest",
          "pytest-timeout"):
    try:
        print(f"  {p} {m.version(p)}")
    except m.PackageNotFoundError:
        print(f"  {p} MISSING")
EOF
    df -h /dev/shm | tail -1
    echo "ulimit -l: $(ulimit -l); CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<unset>}; uname -r: $(uname -r)"
}

install_wheels() {
    if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$CARRY"/wheels/*.whl || return 1
        echo "installed into /tmp/site: $(ls "$CARRY"/wheels | tr '\n' ' ')"
    else
        echo "no $CARRY/wheels: relying on the packages of this python (run 'scripts/gpu_check.sh prepare' first)"
    fi
}

build_ext() {
    rm -f sidecar/_native.*.so sidecar/_cudaipc.*.so
    if command -v gcc >/dev/null && "$PY" -c "import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
        && "$PY" setup.py -q build_ext --inplace --build-temp /tmp/sidecar-build; then
        echo "built the extensions here"
    else
        echo "could not build here (no gcc or Python.h?): using $CARRY/prebuilt"
        cp "$CARRY"/prebuilt/*.so sidecar/ || return 1
    fi
    "$PY" -c "import sidecar._native, sidecar._cudaipc as c; print('extensions import; CUDA IPC available:', c.available(), c.load_error() or '', 'driver', c.driver_version() if c.available() else '-')" || return 1
    # the generated protobuf code needs a protobuf runtime at least as new as the one that made it
    "$PY" -c "import google.protobuf as p, grpc, grpc_status, grpc_health, grpc_reflection, sidecar.v1.sidecar_pb2; print('protobuf', p.__version__, p.__file__); print('grpcio', grpc.__version__, grpc.__file__)"
}

smoke() {
    "$PY" - <<'EOF'
import torch
from sidecar.dataplane import cuda_ipc
print("uuid of cuda:0:", cuda_ipc.device_uuid(0), "| torch says", torch.cuda.get_device_properties(0).uuid)
t = torch.arange(10, dtype=torch.float32, device="cuda")
ref = cuda_ipc.tensor_to_ref(t)
print("export:", ref.storage.offset, ref.storage.nbytes, ref.storage.alloc_nbytes, ref.storage.handle[:8].hex())
back = cuda_ipc.ref_to_tensor(ref)
assert back.data_ptr() == t.data_ptr() and torch.equal(back, t)
print("own handle resolves to the same memory: ok")
EOF
}

export PYTHONPATH="$ROOT:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PY CARRY ROOT OUT
export -f env_info install_wheels build_ext smoke
step "environment" 20 bash -c env_info
step "wheels" 40 bash -c install_wheels
step "build" 60 bash -c build_ext
step "smoke" 30 bash -c smoke
step "tests: direct IPC + CPU-side" 45 "$PY" -m pytest -q -p no:cacheprovider --timeout 40 -rs \
    --junitxml="$OUT/junit_direct.xml" tests/gpu/test_cuda_ipc_direct.py tests/test_cuda_ipc_cpu.py
step "benchmark" 60 "$PY" benchmarks/bench_cuda_ipc.py --repeat 20 --json-out "$OUT/bench_cuda_ipc.json"
step "tests: through a CUDA worker" 120 "$PY" -m pytest -v -p no:cacheprovider --timeout 60 --durations=8 -rs \
    --junitxml="$OUT/junit_worker.xml" tests/gpu/test_cuda_ipc.py tests/test_dispatcher.py::test_cuda_worker_runs_shm_inputs_on_the_gpu \
    tests/test_dispatcher.py::test_cuda_out_of_memory_is_structured_and_survived \
    tests/test_hardware.py::test_gpus_are_listed_where_present
say ""
say "=== summary ($(( $(date +%s) - START ))s of ${BUDGET}s)"
for line in "${SUMMARY[@]}"; do say "  $line"; done
ls -l "$OUT" | tee -a "$LOG"
