"""CUDA IPC on a machine without CUDA: the extension imports, reports why CUDA is absent, and every
GPU entry point fails cleanly (DeviceUnavailable / CudaError), never crashes.

The driver is loaded once per process, so each scenario runs in a fresh interpreter:
- `SIDECAR_LIBCUDA=/nonexistent/...` stands for "no NVIDIA driver" on any machine (a GPU machine too);
- `SIDECAR_LIBCUDA=<libm>` is a library that is not the driver (symbols missing);
- `SIDECAR_LIBCUDA=<stand-in>` is a tiny C library with the driver's entry points, compiled here. It
  lets the C code's argument handling, primary-context switching, error naming (cuGetErrorName) and
  open/close pairing run where no GPU exists. It checks that a context is current where the real
  driver needs one. What it cannot show (real mappings, real bytes) is tested in tests/gpu/.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sidecar import _cudaipc
from sidecar.dataplane import cuda_ipc
from sidecar.errors import InvalidTensorRef
from sidecar.protocol.refs import CudaIpcStorage, TensorRef

MISSING = {"SIDECAR_LIBCUDA": "/nonexistent/libcuda.so.1"}

# A stand-in for libcuda.so.1 (see the module docstring). 2 devices; device pointers in
# [0x10000000, 0x20000000) live on device 0 in 1 MiB allocations; those >= 0x18000000 are "VMM"
# memory (not legacy-IPC capable). Opened handles map at 0x30000000 + the allocation's offset.
STAND_IN = r"""
#include <stdint.h>
#include <string.h>
typedef int CUresult; typedef unsigned long long P; typedef void *CTX;
typedef struct { char r[64]; } H; typedef struct { unsigned char b[16]; } U;
static __thread CTX cur; static int opened[64]; static int registered[16]; static void *reg_addr[16];
static int need_ctx(int dev) { return cur == (CTX)(uintptr_t)(0x1000 + dev) ? 0 : 201; }
CUresult cuGetErrorName(CUresult e, const char **s) {
  switch (e) { case 0: *s = "CUDA_SUCCESS"; return 0; case 1: *s = "CUDA_ERROR_INVALID_VALUE"; return 0;
  case 201: *s = "CUDA_ERROR_INVALID_CONTEXT"; return 0; case 400: *s = "CUDA_ERROR_INVALID_HANDLE"; return 0;
  case 712: *s = "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED"; return 0;
  case 713: *s = "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED"; return 0;
  case 801: *s = "CUDA_ERROR_NOT_SUPPORTED"; return 0; default: return 1; } }
CUresult cuGetErrorString(CUresult e, const char **s) { (void)e; *s = "stand-in driver"; return 0; }
CUresult cuInit(unsigned f) { return f == 0 ? 0 : 1; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return 0; }
CUresult cuDeviceGetCount(int *n) { *n = 2; return 0; }
CUresult cuDeviceGet(int *d, int i) { if (i < 0 || i > 1) return 101; *d = i; return 0; }
CUresult cuDeviceGetUuid_v2(U *u, int d) { for (int i = 0; i < 16; i++) u->b[i] = (unsigned char)(16 * i + d); return 0; }
CUresult cuDevicePrimaryCtxRetain(CTX *c, int d) { *c = (CTX)(uintptr_t)(0x1000 + d); return 0; }
CUresult cuCtxGetCurrent(CTX *c) { *c = cur; return 0; }
CUresult cuCtxSetCurrent(CTX c) { cur = c; return 0; }
CUresult cuCtxSynchronize(void) { return cur ? 0 : 201; }
static int on_dev0(P p) { return p >= 0x10000000ull && p < 0x20000000ull; }
CUresult cuPointerGetAttribute(void *out, int attr, P p) {
  if (!on_dev0(p) && !(p >= 0x30000000ull && p < 0x40000000ull)) return 1;
  if (attr == 9) { *(int *)out = 0; return 0; }
  if (need_ctx(0)) return 201;
  if (attr == 10) { *(unsigned char *)out = p < 0x18000000ull; return 0; }
  if (attr == 7) { *(unsigned long long *)out = p >> 20; return 0; }
  return 1; }
CUresult cuMemGetAddressRange_v2(P *base, size_t *size, P p) {
  if (need_ctx(0)) return 201; if (!on_dev0(p) && !(p >= 0x30000000ull && p < 0x40000000ull)) return 1;
  *base = p & ~0xFFFFFull; *size = 1u << 20; return 0; }
CUresult cuMemGetInfo_v2(size_t *f, size_t *t) { if (!cur) return 201; *f = 1u << 30; *t = 2u << 30; return 0; }
CUresult cuIpcGetMemHandle(H *h, P base) {
  if (need_ctx(0)) return 201; if (base & 0xFFFFF) return 1;
  memset(h, 0, sizeof *h); memcpy(h->r, "FAKE", 4); memcpy(h->r + 8, &base, 8); return 0; }
CUresult cuIpcOpenMemHandle_v2(P *p, H h, unsigned flags) {
  if (!cur) return 201; if (flags != 1) return 1; if (memcmp(h.r, "FAKE", 4)) return 400;
  P base; memcpy(&base, h.r + 8, 8); unsigned slot = (unsigned)((base >> 20) & 63);
  opened[slot]++; *p = 0x30000000ull + (base & 0x0FFFFFFFull); return 0; }
CUresult cuIpcCloseMemHandle(P p) {
  if (!cur) return 201; unsigned slot = (unsigned)((p >> 20) & 63);
  if (p < 0x30000000ull || opened[slot] <= 0) return 1; opened[slot]--; return 0; }
CUresult cuMemHostRegister_v2(void *a, size_t n, unsigned flags) {
  (void)n; if (!cur) return 201; if (!(flags & 1)) return 1;
  for (int i = 0; i < 16; i++) if (registered[i] && reg_addr[i] == a) return 712;
  for (int i = 0; i < 16; i++) if (!registered[i]) { registered[i] = 1; reg_addr[i] = a; return 0; }
  return 2; }
CUresult cuMemHostUnregister(void *a) {
  for (int i = 0; i < 16; i++) if (registered[i] && reg_addr[i] == a) { registered[i] = 0; return 0; }
  return 713; }
"""


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("libcuda")
    src, lib = d / "standin.c", d / "libcuda-standin.so"
    src.write_text(STAND_IN)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(lib), str(src)], check=True)
    return str(lib)


def run_py(code: str, env: dict[str, str]) -> dict:
    """Runs `code` in a fresh interpreter (the driver loads once per process); it prints one JSON."""
    full = {**os.environ, **env}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------
# no driver

def test_import_does_not_load_the_driver() -> None:
    # Importing must not touch CUDA (fork-safety of template processes): the driver library is not
    # even mapped after importing both the extension and the Python module.
    out = run_py("""
        import json, sidecar._cudaipc, sidecar.dataplane.cuda_ipc
        maps = open('/proc/self/maps').read()
        print(json.dumps({'mapped': 'libcuda' in maps}))
    """, {})
    assert out == {"mapped": False}


def test_missing_driver_is_reported_and_every_entry_point_fails_cleanly() -> None:
    out = run_py("""
        import json
        from sidecar import _cudaipc as c
        res = {'available': c.available(), 'reason': c.load_error()}
        calls = {
            'device_count': lambda: c.device_count(),
            'driver_version': lambda: c.driver_version(),
            'device_uuid': lambda: c.device_uuid(0),
            'pointer_info': lambda: c.pointer_info(0x10000000),
            'export': lambda: c.export(0x10000000),
            'open': lambda: c.open(bytes(64), 0),
            'close': lambda: c.close(0x30000000, 0),
            'host_register': lambda: c.host_register(0x10000, 4096),
            'host_unregister': lambda: c.host_unregister(0x10000),
            'mem_get_info': lambda: c.mem_get_info(0),
        }
        errs = {}
        for name, fn in calls.items():
            try:
                fn()
                errs[name] = 'no error'
            except c.CudaUnavailableError as e:
                errs[name] = [type(e).__name__, e.code, e.name, isinstance(e, c.CudaError), str(e)]
        res['errors'] = errs
        print(json.dumps(res))
    """, MISSING)
    assert out["available"] is False
    assert "/nonexistent/libcuda.so.1" in out["reason"] and "could not be loaded" in out["reason"]
    for name, err in out["errors"].items():
        assert err != "no error", name
        kind, code, cname, is_cuda_error, text = err
        assert (kind, code, cname, is_cuda_error) == ("CudaUnavailableError", -1, "CUDA_UNAVAILABLE", True)
        assert "NVIDIA driver" in text, name


def test_python_layer_maps_missing_driver_to_device_unavailable() -> None:
    out = run_py("""
        import json, torch
        from sidecar._native import Segment
        from sidecar.dataplane import cuda_ipc
        from sidecar.protocol.refs import CudaIpcStorage, TensorRef
        from sidecar.errors import DeviceUnavailable, InvalidArgument
        res = {'available': cuda_ipc.available(), 'reason': cuda_ipc.unavailable_reason()}
        ref = TensorRef('float32', (4,), CudaIpcStorage(b'h' * 64, 0, 16, 0, 'GPU-x', 1 << 20))
        freed = []
        for name, fn in {'ref_to_tensor': lambda: cuda_ipc.ref_to_tensor(ref, input_index=2,
                                                                         on_free=lambda: freed.append(1)),
                         'device_uuid': lambda: cuda_ipc.device_uuid(0)}.items():
            try:
                fn(); res[name] = 'no error'
            except DeviceUnavailable as e:
                res[name] = e.to_dict()
        try:
            cuda_ipc.tensor_to_ref(torch.ones(3))
        except InvalidArgument as e:
            res['tensor_to_ref'] = e.message
        res['freed'] = freed
        print(json.dumps(res))
    """, MISSING)
    assert out["available"] is False and "could not be loaded" in out["reason"]
    err = out["ref_to_tensor"]
    assert err["kind"] == "DEVICE_UNAVAILABLE" and err["device"] == "cuda" and err["available"] == ["cpu"]
    assert "a CUDA IPC tensor arrived" in err["message"] and "libcuda.so.1" in err["message"]
    assert out["device_uuid"]["kind"] == "DEVICE_UNAVAILABLE"
    assert out["freed"] == [1]  # on_free runs exactly once, also when the ref is refused
    assert "CUDA tensors" in out["tensor_to_ref"]


def test_register_host_memory_without_driver_is_a_clean_no() -> None:
    out = run_py("""
        import json
        from sidecar.dataplane import cuda_ipc, segments
        seg = segments.create_segment(1 << 16, 'cudaipccpu')
        try:
            res = {'registered': cuda_ipc.register_host_memory(seg),
                   'unregistered': cuda_ipc.unregister_host_memory(seg)}
        finally:
            seg.close(); segments.unlink_segment(seg.name)
        print(json.dumps(res))
    """, MISSING)
    assert out == {"registered": False, "unregistered": False}


def test_a_library_that_is_not_the_driver() -> None:
    out = run_py("""
        import json
        from sidecar import _cudaipc as c
        print(json.dumps({'available': c.available(), 'reason': c.load_error()}))
    """, {"SIDECAR_LIBCUDA": "libm.so.6"})
    assert out["available"] is False
    assert "has no cuGetErrorName" in out["reason"] and "driver is too old" in out["reason"]


# ---------------------------------------------------------------------------------------------------
# descriptor validation (no driver needed: refused before anything is opened)

@pytest.mark.parametrize("handle", [b"", b"x" * 63, b"x" * 65, "x" * 64])
def test_bad_handle_length_is_an_invalid_tensor_ref(handle: object) -> None:
    ref = TensorRef("float32", (4,), CudaIpcStorage(handle, 0, 16, 0, "GPU-x", 0))  # type: ignore[arg-type]
    with pytest.raises(InvalidTensorRef) as ei:
        cuda_ipc.ref_to_tensor(ref, input_index=1)
    assert ei.value.field == "handle" and ei.value.input_index == 1


@pytest.mark.parametrize("offset,nbytes,field", [(1 << 20, 16, "nbytes"), ((1 << 20) - 8, 16, "nbytes"),
                                                  (-1, 16, "offset")])
def test_region_beyond_the_declared_allocation_is_refused(offset: int, nbytes: int, field: str) -> None:
    ref = TensorRef("float32", (4,), CudaIpcStorage(b"h" * 64, offset, nbytes, 0, "GPU-x", 1 << 20))
    with pytest.raises(InvalidTensorRef) as ei:
        cuda_ipc.ref_to_tensor(ref)
    assert ei.value.field == field


def test_on_free_is_called_once_when_a_ref_is_refused() -> None:
    calls: list[int] = []
    ref = TensorRef("float32", (4,), CudaIpcStorage(b"x" * 10, 0, 16, 0, "GPU-x", 0))
    with pytest.raises(InvalidTensorRef):
        cuda_ipc.ref_to_tensor(ref, on_free=lambda: calls.append(1))
    assert calls == [1]


def test_extension_argument_checks() -> None:
    with pytest.raises(ValueError, match="exactly 64 bytes, got 10"):
        _cudaipc.open(b"x" * 10, 0)
    with pytest.raises(TypeError, match="must be bytes"):
        _cudaipc.open(12, 0)
    with pytest.raises(OverflowError):
        _cudaipc.export(-1)
    with pytest.raises(TypeError):
        _cudaipc.export("0x10")
    with pytest.raises(ValueError, match="NULL device pointer"):
        _cudaipc.export(0)
    with pytest.raises(ValueError, match="non-NULL address"):
        _cudaipc.host_register(0, 10)


# ---------------------------------------------------------------------------------------------------
# DLPack capsules (no driver needed to make one)

def test_unconsumed_capsule_calls_its_owner_exactly_once() -> None:
    calls: list[int] = []
    for i in range(100):
        cap = _cudaipc.dlpack(0x10000000, 0, 2, 32, [2, 3], [3, 1], lambda i=i: calls.append(i))
        assert type(cap).__name__ == "PyCapsule"
        del cap
    assert calls == list(range(100))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_capsule_owner_errors_do_not_crash() -> None:
    def boom() -> None:
        raise RuntimeError("owner failed")

    cap = _cudaipc.dlpack(0x10000000, 0, 2, 32, [1], [1], boom)
    del cap  # the error is reported as unraisable, the process goes on


@pytest.mark.parametrize("name", ["float16", "bfloat16", "float32", "float64", "int8", "int16", "int32",
                                  "int64", "uint8", "bool", "complex64", "complex128"])
def test_torch_consumes_our_capsule_without_copying(name: str) -> None:
    # The same capsule code path as for CUDA memory, pointed at host memory (device_type 1 =
    # kDLCPU) so that real torch checks our DLPack structs: dtype codes, shape, element strides,
    # and that the owner is called once, when torch frees the tensor.
    import torch

    dtype = getattr(torch, name)
    src = (torch.arange(24) % 5).to(dtype).reshape(4, 6)
    code, bits = cuda_ipc._dl_dtype(name)
    freed: list[int] = []
    view = src.t()  # non-contiguous: strides in elements (1, 6)
    cap = _cudaipc.dlpack(view.data_ptr(), 0, code, bits, list(view.shape), list(view.stride()),
                          lambda: freed.append(1), device_type=1)
    t = torch.utils.dlpack.from_dlpack(cap)
    del cap
    assert t.dtype == dtype and t.shape == view.shape and t.stride() == view.stride()
    assert t.data_ptr() == view.data_ptr() and torch.equal(t, view)
    assert freed == []
    t2 = t[1:]  # a view keeps the memory
    del t
    assert freed == []
    del t2
    assert freed == [1]


@pytest.mark.parametrize("args", [
    (0x1, 0, 2, 32, [2], [1, 1], None),   # shape and strides differ in length
    (0x1, 0, 2, 0, [2], [1], None),       # zero bits
    (0x1, -1, 2, 32, [2], [1], None),     # negative device
    (0x1, 0, 2, 32, ["a"], [1], None),    # not ints
])
def test_capsule_argument_checks(args: tuple) -> None:
    with pytest.raises((ValueError, TypeError)):
        _cudaipc.dlpack(*args)


# ---------------------------------------------------------------------------------------------------
# the C layer against the stand-in driver

def test_c_layer_against_a_stand_in_driver(stand_in: str) -> None:
    out = run_py("""
        import json
        from sidecar import _cudaipc as c
        res = {'available': c.available(), 'reason': c.load_error(), 'count': c.device_count(),
               'version': c.driver_version(), 'uuid0': c.device_uuid(0), 'uuid1': c.device_uuid(1)}
        h, off, size, dev = c.export(0x10123456)
        res['export'] = [h[:4].decode(), off, size, dev]
        res['export_dev'] = list(c.export(0x10123456, 0)[1:])
        res['info'] = list(c.pointer_info(0x10123456))
        base, osize = c.open(h, 0)
        res['open'] = [base, osize]
        c.close(base, 0)
        def err(fn):
            try:
                fn(); return 'no error'
            except c.CudaError as e:
                return [type(e).__name__, e.call, e.code, e.name, str(e)]
        res['vmm'] = err(lambda: c.export(0x18000000))
        res['not_device'] = err(lambda: c.export(0x5000))
        res['bad_handle'] = err(lambda: c.open(b'NOPE' + bytes(60), 0))
        res['double_close'] = err(lambda: c.close(base, 0))
        try:
            c.open(h, 7); res['bad_device'] = 'no error'
        except ValueError as e:
            res['bad_device'] = str(e)
        import ctypes
        buf = ctypes.create_string_buffer(8192)
        addr = ctypes.addressof(buf)
        res['register'] = [c.host_register(addr, 8192), c.host_register(addr, 8192, read_only=True),
                           c.host_unregister(addr), c.host_unregister(addr)]
        res['meminfo'] = list(c.mem_get_info(1))
        print(json.dumps(res))
    """, {"SIDECAR_LIBCUDA": stand_in})
    assert out["available"] is True and out["reason"] is None
    assert (out["count"], out["version"]) == (2, 13000)
    assert out["uuid0"] == "GPU-00102030-4050-6070-8090-a0b0c0d0e0f0"
    assert out["uuid1"] == "GPU-01112131-4151-6171-8191-a1b1c1d1e1f1"
    # the handle names the 1 MiB allocation's base; the pointer's offset from it comes back
    assert out["export"] == ["FAKE", 0x23456, 1 << 20, 0]
    assert out["export_dev"] == [0x23456, 1 << 20, 0]
    assert out["info"] == [0, 0x10100000, 1 << 20, 0x101, True]
    assert out["open"] == [0x30100000, 1 << 20]
    kind, call, code, name, text = out["vmm"]
    assert (kind, call, code, name) == ("CudaError", "cuIpcGetMemHandle", 801, "CUDA_ERROR_NOT_SUPPORTED")
    assert "0x18000000" in text and "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False" in text
    assert out["not_device"][1:4] == ["cuPointerGetAttribute(DEVICE_ORDINAL)", 1, "CUDA_ERROR_INVALID_VALUE"]
    assert "0x5000" in out["not_device"][4]
    assert out["bad_handle"][1:4] == ["cuIpcOpenMemHandle", 400, "CUDA_ERROR_INVALID_HANDLE"]
    assert "handle 4e4f5045" in out["bad_handle"][4] and "device 0" in out["bad_handle"][4]
    assert out["double_close"][1:4] == ["cuIpcCloseMemHandle", 1, "CUDA_ERROR_INVALID_VALUE"]
    assert out["bad_device"] == "CUDA device ordinal 7 does not exist: 2 device(s) are visible"
    assert out["register"] == [True, False, True, False]
    assert out["meminfo"] == [1 << 30, 2 << 30]


def test_context_of_the_caller_is_restored(stand_in: str) -> None:
    # The stand-in keeps a per-thread current context: after our calls it must be what it was.
    out = run_py("""
        import ctypes, json, os
        lib = ctypes.CDLL(os.environ['SIDECAR_LIBCUDA'])
        from sidecar import _cudaipc as c
        c.available()
        mine = ctypes.c_void_p(0x7777)
        lib.cuCtxSetCurrent(mine)
        c.export(0x10000010); c.device_uuid(0); c.mem_get_info(1)
        got = ctypes.c_void_p()
        lib.cuCtxGetCurrent(ctypes.byref(got))
        print(json.dumps({'current': got.value}))
    """, {"SIDECAR_LIBCUDA": stand_in})
    assert out == {"current": 0x7777}


def test_driver_is_refused_in_a_forked_child(stand_in: str) -> None:
    out = run_py("""
        import json, os
        from sidecar import _cudaipc as c
        assert c.available()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                c.device_count(); msg = 'no error'
            except c.CudaUnavailableError as e:
                msg = str(e)
            os.write(w, msg.encode()); os._exit(0)
        os.close(w); os.waitpid(pid, 0)
        print(json.dumps({'child': os.read(r, 4096).decode(), 'parent': c.device_count()}))
    """, {"SIDECAR_LIBCUDA": stand_in})
    assert "does not survive fork" in out["child"] and out["parent"] == 2


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="checks the path of a torch without CUDA; tests/gpu covers the real one")
def test_python_layer_against_the_stand_in(stand_in: str) -> None:
    # The driver loads, but this torch has no CUDA: refs are refused with a reason that says so.
    # Pinned-memory registration and device lookup by uuid work through the driver alone.
    out = run_py("""
        import json
        from sidecar.dataplane import cuda_ipc, segments
        from sidecar.protocol.refs import CudaIpcStorage, TensorRef
        from sidecar.errors import DeviceUnavailable
        res = {'reason': cuda_ipc.unavailable_reason(),
               'uuid1': cuda_ipc.device_uuid(1),
               'ordinal': cuda_ipc.ordinal_of_uuid(cuda_ipc.device_uuid(1)),
               'fallback': cuda_ipc.ordinal_of_uuid('', 1)}
        try:
            cuda_ipc.ordinal_of_uuid('GPU-not-here')
        except DeviceUnavailable as e:
            res['unknown_uuid'] = e.to_dict()
        try:
            cuda_ipc.ref_to_tensor(TensorRef('float32', (4,), CudaIpcStorage(b'FAKE' + bytes(60), 0, 16)))
        except DeviceUnavailable as e:
            res['ref'] = e.message
        seg = segments.create_segment(1 << 16, 'cudaipccpu')
        try:
            res['pin'] = [cuda_ipc.register_host_memory(seg), cuda_ipc.register_host_memory(seg),
                          cuda_ipc.unregister_host_memory(seg), cuda_ipc.unregister_host_memory(seg)]
        finally:
            seg.close(); segments.unlink_segment(seg.name)
        print(json.dumps(res))
    """, {"SIDECAR_LIBCUDA": stand_in})
    assert "has no usable CUDA" in out["reason"]
    assert out["uuid1"].startswith("GPU-0111") and out["ordinal"] == 1 and out["fallback"] == 1
    assert out["unknown_uuid"]["kind"] == "DEVICE_UNAVAILABLE" and "CUDA_VISIBLE_DEVICES" in out["unknown_uuid"]["message"]
    assert "has no usable CUDA" in out["ref"]
    assert out["pin"] == [True, True, True, False]


def test_handle_cache_refcounts_against_the_stand_in(stand_in: str) -> None:
    # The cache's bookkeeping with the real C layer underneath (no torch.cuda needed): a handle is
    # opened once however many tensors use it, and closed exactly once by the last one, including
    # when torch frees a tensor through the DLPack deleter chain.
    out = run_py("""
        import gc, json, torch
        from sidecar import _cudaipc as c
        from sidecar.dataplane import cuda_ipc as ci
        h, off, size, dev = c.export(0x10200040)
        uuid = ci.device_uuid(0)
        a = ci._acquire(h, uuid, 0, None)
        b = ci._acquire(h, uuid, 0, None)
        res = {'same': a is b, 'refs': a.refs, 'base': a.base, 'size': a.size}
        res['after_two'] = ci.cache_stats()
        ci._release(a.key)
        res['after_one_release'] = ci.cache_stats()
        # the last reference is held by a tensor: torch frees it -> owner -> _release -> close
        freed = []
        buf = torch.zeros(16)
        cap = c.dlpack(buf.data_ptr(), 0, 2, 32, [16], [1], ci._Owner(b.key, None, lambda: freed.append(1)),
                       device_type=1)
        t = torch.utils.dlpack.from_dlpack(cap)
        del cap
        res['before_free'] = ci.cache_stats()
        del t
        gc.collect()
        res['after_free'] = ci.cache_stats()
        res['freed'] = freed
        try:
            ci._check_bounds(1 << 20, (1 << 20) - 8, 16, 3)
        except Exception as e:
            res['bounds'] = [type(e).__name__, e.field, e.input_index]
        try:
            ci._acquire(b'NOPE' + bytes(60), uuid, 0, 5)
        except Exception as e:
            res['bad'] = [type(e).__name__, e.field, e.input_index, 'CUDA_ERROR_INVALID_HANDLE' in e.message]
        res['final'] = ci.cache_stats()
        print(json.dumps(res))
    """, {"SIDECAR_LIBCUDA": stand_in})
    assert out["same"] is True and out["refs"] == 2
    assert (out["base"], out["size"]) == (0x30200000, 1 << 20)
    assert out["after_two"]["opens"] == 1 and out["after_two"]["hits"] == 1
    assert out["after_two"]["open_handles"] == 1
    assert out["after_one_release"]["open_handles"] == 1 and out["after_one_release"]["closes"] == 0
    assert out["before_free"]["open_handles"] == 1
    assert out["after_free"]["open_handles"] == 0 and out["after_free"]["closes"] == 1
    assert out["after_free"]["close_errors"] == 0  # the stand-in refuses a close of an unopened pointer
    assert out["freed"] == [1]
    assert out["bounds"] == ["InvalidTensorRef", "nbytes", 3]
    assert out["bad"] == ["InvalidTensorRef", "handle", 5, True]
    assert out["final"]["open_handles"] == 0 and out["final"]["opens"] == 1
