#!/usr/bin/env bash
# Memory check of the C extension (native/shm.c) under AddressSanitizer + LeakSanitizer.
#
# Builds sidecar._native with -fsanitize=address into a private copy of the package (the tree's own
# build is never touched), then, with libasan preloaded into the venv's python:
#   1. a churn driver: thousands of create/open/export/close-while-exported/unlink cycles and every
#      error path; fails if Python-heap memory (tracemalloc) or the number of mappings grows;
#   2. tests/test_native_segments.py, once.
# Any ASan error aborts the run; at exit LeakSanitizer lists unreachable blocks, and the check fails
# if any of them was allocated with sidecar._native on the stack (CPython and torch leave plenty of
# their own at exit, which are not ours and are only counted).
# Usage: scripts/check_native_memory.sh            (exit 0 = clean; NATIVE_SRC=path checks another source)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
LIBASAN=$(gcc -print-file-name=libasan.so)
[ -e "$LIBASAN" ] || { echo "libasan not found (gcc -print-file-name=libasan.so)"; exit 2; }

WORK=$(mktemp -d /tmp/native-asan.XXXXXX)
trap '[ -n "${KEEP_ASAN_LOGS:-}" ] || rm -rf "$WORK"' EXIT
mkdir -p "$WORK/pkg" "$WORK/logs"
# A private copy of the package, with the sanitized extension in place of the normal one.
tar -C "$ROOT" --exclude='*.so' --exclude=__pycache__ -cf - sidecar | tar -C "$WORK/pkg" -xf -
SRC=$(realpath "${NATIVE_SRC:-native/shm.c}")
INC=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
SUFFIX=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
gcc -shared -fPIC -std=gnu11 -O1 -g -fno-omit-frame-pointer -fsanitize=address -Wall -Wextra -Werror \
    -I"$INC" "$SRC" -o "$WORK/pkg/sidecar/_native$SUFFIX" -lrt
echo "built $WORK/pkg/sidecar/_native$SUFFIX with -fsanitize=address"

export LD_PRELOAD=$LIBASAN PYTHONMALLOC=malloc
export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:abort_on_error=0:exitcode=86:detect_odr_violation=0:alloc_dealloc_mismatch=0:new_delete_type_mismatch=0:log_path=$WORK/logs/asan"
export LSAN_OPTIONS="exitcode=0:report_objects=0:fast_unwind_on_malloc=0"
cd "$WORK/pkg"  # `python -m` puts the cwd first on sys.path: the sanitized copy wins

"$PY" - <<'PY'
import gc, os, tracemalloc
import numpy as np, torch
import sidecar._native as n
from sidecar._native import Segment
assert os.environ["LD_PRELOAD"] and n.__file__.startswith(os.getcwd()), n.__file__
n.install_sigbus_handler(); n.install_sigbus_handler()

def maps() -> int:
    """Mappings of our churn segments still in the address space (an unmap that never happened)."""
    with open("/proc/self/maps") as f:
        return sum("/dev/shm/native-asan-" in line for line in f)

def cycle(i: int) -> None:
    name = f"/native-asan-{os.getpid()}-{i:08x}"  # not sc-: other runs of the leak fixture must not see it
    seg = Segment.create(name, 65536 + i % 3, prefault=bool(i % 2))
    a = np.frombuffer(seg, dtype=np.uint8)
    t = torch.frombuffer(memoryview(seg), dtype=torch.uint8)
    a[:] = i & 0xFF
    seg.close()                      # deferred: views alive
    assert int(t[-1]) == i & 0xFF
    del a, t                         # last release unmaps
    for exc, call in ((FileExistsError, lambda: Segment.create(name, 1)),
                      (ValueError, lambda: memoryview(seg)),
                      (ValueError, lambda: Segment.create(name + "\0", 1)),
                      (ValueError, lambda: Segment.create(name, -1))):
        try:
            call()
        except exc:
            pass
    ro = Segment.open(name)
    try:
        memoryview(ro).tolist()
        import io
        io.BytesIO(b"x").readinto(ro)  # asks for a writable buffer: refused
    except (BufferError, TypeError):
        pass
    repr(ro); ro.address; ro.inode
    with Segment.open(name, writable=True) as rw:
        memoryview(rw)[0] = 1
        rw.zero(1, 4096 + i % 7); rw.zero(0, 0)
    cow = Segment.open(name, private=True)  # copy-on-write, counted through /proc/self/pagemap
    v = np.frombuffer(cow, dtype=np.uint8)
    v[i % 65536] = 7
    assert cow.private_pages() == 1 and ro.private_pages(offset=4096) == 0
    for exc, call in ((ValueError, lambda: cow.private_pages(offset=-1)),
                      (ValueError, lambda: Segment.open(name, writable=True, private=True)),
                      (BufferError, lambda: ro.zero(0, 1)), (ValueError, lambda: cow.zero(0, 1 << 20))):
        try:
            call()
        except exc:
            pass
    cow.close(); del v
    ro.close(); ro.close()
    n.unlink(name)
    os.mkfifo("/dev/shm" + name)  # refused without blocking: not a regular file
    try:
        Segment.open(name)
    except OSError:
        pass
    os.unlink("/dev/shm" + name)
    for exc, call in ((FileNotFoundError, lambda: n.unlink(name)),
                      (FileNotFoundError, lambda: Segment.open(name)),
                      (OSError, lambda: Segment.create(name, 1 << 55))):
        try:
            call()
        except exc:
            pass
    z = Segment.create(name, 0)
    memoryview(z); z.close(); n.unlink(name)

for i in range(200):                 # warm-up: caches, interned strings, torch lazy init
    cycle(i)
gc.collect()
tracemalloc.start()
m0, t0 = maps(), tracemalloc.get_traced_memory()[0]
N = 3000
for i in range(200, 200 + N):
    cycle(i)
gc.collect()
m1, t1 = maps(), tracemalloc.get_traced_memory()[0]
tracemalloc.stop()  # its own tables would show up as leaks at exit
print(f"churn: {N} cycles, mappings {m0} -> {m1}, python heap {t0} -> {t1} bytes ({(t1 - t0) / N:.2f} B/cycle)")
assert m0 == m1 == 0, "mappings leaked"
assert t1 - t0 < 64 * 1024, "python objects leaked"
assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"native-asan-{os.getpid()}-")]
PY
echo "churn driver: ok"

set +e
# tests/ is not a package: its conftest imports tests.workers from ROOT, which comes after the cwd
# (the sanitized copy of sidecar) on sys.path.
PYTHONPATH="$ROOT" "$PY" -m pytest -q -p no:cacheprovider "$ROOT/tests/test_native_segments.py" \
    "$ROOT/tests/test_writable_inputs.py::test_private_mapping_is_copy_on_write_and_counts_written_pages"
rc=$?
set -e
[ $rc -eq 0 ] || { echo "pytest under ASan failed (rc=$rc)"; cat "$WORK"/logs/asan* 2>/dev/null | head -80; exit 1; }

reports=$(cat "$WORK"/logs/asan* 2>/dev/null || true)
if grep -q "ERROR: AddressSanitizer" <<<"$reports"; then
    echo "AddressSanitizer error:"; grep -A40 "ERROR: AddressSanitizer" <<<"$reports" | head -80; exit 1
fi
leaks=$(grep -cE "^(Direct|Indirect) leak" <<<"$reports" || true)
# A record is ours when sidecar._native is on its allocation stack, except tracemalloc's own
# bookkeeping (allocated by _tracemalloc.c while tracing a string we made, freed long ago).
ours=$(awk '/^(Direct|Indirect) leak/{blk=$0; next}
            /^$/{if (blk && hit && !tm) print blk; blk=""; hit=0; tm=0; next}
            /_tracemalloc\.c/{tm=1} $0 ~ pat {hit=1}' pat="_native\\.|$(basename "$SRC")" <<<"$reports")
if [ -n "$ours" ]; then
    echo "leaks with sidecar._native on the allocation stack:"; echo "$ours"; exit 1
fi
echo "ASan: no errors; LeakSanitizer: $leaks leak records at exit, none allocated under sidecar._native"
echo "check_native_memory: OK"
