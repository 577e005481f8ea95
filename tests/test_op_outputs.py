"""Ops writing their outputs straight into the worker's arena (`ctx.empty`, CPU workers).

A real in-process runtime over real shared memory: an output lying in a block the call handed out
is leased as it is (no copy); every other block goes back to the arena when the call ends, also on
errors, cancellation and OUT/INLINE placements; a leased block is never reused while leased. Then
the built-in ops that use it, bit for bit against torch's own allocation, and once through a real
worker process and `sidecar.host.Client`.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from sidecar.dataplane import tensors
from sidecar.dataplane.arena import Arena, size_class
from sidecar.dataplane.mapcache import MappingCache
from sidecar.errors import Cancelled, OpFailed
from sidecar.protocol.calls import Call, OutputSpec, Placement
from sidecar.protocol.refs import InlineStorage, ShmStorage, TensorRef
from sidecar.worker import builtin_ops
from sidecar.worker.registry import OpContext, make_spec
from sidecar.worker.runtime import WorkerOptions, build_runtime
from tests.workers import assert_run_clean, run_id, session_run, start_worker

MIB4 = 1 << 20  # float32 elements in 4 MiB
KEPT: list[torch.Tensor] = []  # what `stash` keeps across calls (a misuse the worker must survive)
RESULT_PTRS: list[int] = []  # where the results of `t.traced` ops lay in the worker's memory


def traced(fn):
    """A built-in op as it runs in the dispatcher (same ctx), noting where its result lies."""
    def run_traced(*xs, ctx, **attrs):
        result = fn(*xs, ctx=ctx, **attrs)
        RESULT_PTRS.append(result.data_ptr())
        return result
    return run_traced


def two_blocks(x: torch.Tensor, ctx: OpContext) -> torch.Tensor:
    keep, scratch = ctx.empty(x.shape, x.dtype), ctx.empty((x.numel() * 2,), "float64")
    torch.mul(x, 3, out=keep)
    scratch.fill_(1.0)  # written, then dropped: its block must go back when the call ends
    return keep


def fails_after_empty(x: torch.Tensor, ctx: OpContext) -> torch.Tensor:
    ctx.empty(x.shape, x.dtype).copy_(x)
    raise ValueError("failed after ctx.empty")


def strided_view(x: torch.Tensor, ctx: OpContext) -> torch.Tensor:
    full = ctx.empty((x.shape[0], 2 * x.shape[1]), x.dtype)
    full[:, ::2] = x
    full[:, 1::2] = -x
    return full[1:, ::2]  # every other column, rows 1..: a view of part of the block


def small_slice(x: torch.Tensor, ctx: OpContext) -> torch.Tensor:
    return torch.add(x, 1, out=ctx.empty(x.shape, x.dtype))[:4]


def stash(x: torch.Tensor, ctx: OpContext) -> torch.Tensor | None:
    if KEPT:
        return KEPT.pop()
    KEPT.append(torch.mul(x, 5, out=ctx.empty(x.shape, x.dtype)))
    return None


def empty_info(ctx: OpContext, *, n: int, dtype: str) -> list:
    t = ctx.empty(n, dtype)
    return [str(t.dtype), list(t.shape), str(t.device)]


@pytest.fixture
def rt():
    runtime = build_runtime(WorkerOptions(device="cpu", run_id=session_run("opout")))
    for fn in (two_blocks, fails_after_empty, strided_view, small_slice, stash, empty_info):
        runtime.registry.add(make_spec(fn, f"t.{fn.__name__}"))
    for name in ("add", "sub", "mul", "div", "relu", "gelu", "matmul", "softmax", "cast"):
        runtime.registry.add(make_spec(traced(runtime.registry.get(name).fn), f"t.traced.{name}"))
    yield runtime
    KEPT.clear()
    runtime.close()


@pytest.fixture
def host():
    arena, cache, blocks = Arena(session_run("opouthost")), MappingCache(), []

    class Host:
        def ref(self, x: np.ndarray) -> TensorRef:
            ref, block = tensors.to_ref(x, arena, inline_threshold=0)
            blocks.append(block)
            return ref

        def out_ref(self, shape: tuple[int, ...]) -> TensorRef:
            block = arena.alloc(int(np.prod(shape)) * 4)
            blocks.append(block)
            return TensorRef("float32", shape, block.storage())

        def read(self, ref: TensorRef) -> np.ndarray:
            return tensors.to_numpy(ref, cache).copy()

    yield Host()
    for b in blocks:
        b.release()
    cache.clear()
    arena.close()


def run(rt, op, *inputs, placement=Placement.AUTO, out=(), is_cancelled=None, **attrs):
    return rt.dispatcher.execute(Call(op=op, inputs=list(inputs), attrs=attrs,
                                      output=OutputSpec(placement, tuple(out)), is_cancelled=is_cancelled))


def allocations(rt) -> int:
    s = rt.arena.stats()
    return s.hits + s.misses


def worker_segment(rt, ref: TensorRef) -> bool:
    return isinstance(ref.storage, ShmStorage) and ref.storage.name.startswith(rt.dispatcher._own_prefix)


def computed_in_place(rt, ref: TensorRef) -> bool:
    """The op computed its result in the very block leased as `ref` (not copied there afterwards)."""
    hit = rt.arena.find(RESULT_PTRS[-1], ref.nbytes)
    return hit is not None and hit[0].name == ref.storage.name and hit[1] == ref.storage.offset


# ---------------------------------------------------------------------------------------------------
# the dispatcher's side


def test_mul_output_is_leased_in_place(rt, host):
    x = np.random.default_rng(0).standard_normal(MIB4).astype(np.float32)
    xref = host.ref(x)
    for warm in (False, True):
        before = rt.arena.stats()
        res = run(rt, "mul", xref, 2.0)
        out = res.outputs[0]
        # one allocation (the block mul wrote into) and that very block leased: no copy on the way out
        assert worker_segment(rt, out) and out.storage.offset == 0 and out.strides is None
        assert allocations(rt) == before.hits + before.misses + 1
        assert rt.arena.stats().hits == before.hits + warm  # the second call reuses the warm block
        assert rt.arena.stats().in_use_bytes == size_class(x.nbytes) and rt.leases.count == 1
        np.testing.assert_array_equal(host.read(out), x * np.float32(2.0))
        assert rt.release(res.leases) == (1, [])
        assert rt.arena.stats().in_use_bytes == 0 and rt.leases.count == 0
    res = run(rt, "t.traced.mul", xref, 2.0)
    assert computed_in_place(rt, res.outputs[0])
    rt.release(res.leases)


def test_only_the_returned_block_is_leased(rt, host):
    x = np.arange(100_000, dtype=np.float32)
    res = run(rt, "t.two_blocks", host.ref(x))
    assert worker_segment(rt, res.outputs[0])
    # the float64 scratch block (twice the size) went back at the end of the call
    assert rt.arena.stats().in_use_bytes == size_class(x.nbytes) and rt.arena.stats().cached_bytes > 0
    np.testing.assert_array_equal(host.read(res.outputs[0]), x * 3)
    rt.release(res.leases)
    assert rt.arena.stats().in_use_bytes == 0


def test_an_op_that_raises_after_ctx_empty_leaves_nothing_in_use(rt, host):
    with pytest.raises(OpFailed) as info:
        run(rt, "t.fails_after_empty", host.ref(np.ones(100_000, np.float32)))
    assert info.value.exception_type == "ValueError"
    assert rt.arena.stats().in_use_bytes == 0 and rt.leases.count == 0


def test_out_and_inline_placements_copy_then_release(rt, host):
    a = np.random.default_rng(1).standard_normal((300, 400)).astype(np.float32)
    b = np.random.default_rng(2).standard_normal((300, 400)).astype(np.float32)
    out = host.out_ref(a.shape)
    res = run(rt, "mul", host.ref(a), host.ref(b), placement=Placement.OUT, out=[out])
    assert res.outputs == [out] and res.leases == []
    np.testing.assert_array_equal(host.read(out), a * b)
    assert rt.arena.stats().in_use_bytes == 0 and rt.arena.stats().cached_bytes > 0  # the block is warm
    res = run(rt, "mul", host.ref(a), host.ref(b), placement=Placement.INLINE)
    assert isinstance(res.outputs[0].storage, InlineStorage) and res.leases == []
    np.testing.assert_array_equal(host.read(res.outputs[0]), a * b)
    assert rt.arena.stats().in_use_bytes == 0


def test_a_view_of_part_of_a_block_keeps_the_whole_block(rt, host):
    x = np.random.default_rng(3).standard_normal((200, 300)).astype(np.float32)
    res = run(rt, "t.strided_view", host.ref(x))
    out = res.outputs[0]
    # described in place: row 1 of the (200, 600) block, every other column
    assert worker_segment(rt, out) and out.storage.offset == 600 * 4 and out.strides == (600 * 4, 8)
    assert rt.arena.stats().in_use_bytes == size_class(x.nbytes * 2)
    np.testing.assert_array_equal(host.read(out), x[1:])
    rt.release(res.leases)
    assert rt.arena.stats().in_use_bytes == 0


def test_a_small_slice_of_a_block_travels_inline(rt, host):
    x = np.arange(100_000, dtype=np.float32)
    res = run(rt, "t.small_slice", host.ref(x))
    assert isinstance(res.outputs[0].storage, InlineStorage) and res.leases == []
    assert host.read(res.outputs[0]).tolist() == [1, 2, 3, 4]
    assert rt.arena.stats().in_use_bytes == 0
    res = run(rt, "t.small_slice", host.ref(x), placement=Placement.SHM)  # SHM: the block itself
    assert worker_segment(rt, res.outputs[0]) and len(res.leases) == 1
    assert host.read(res.outputs[0]).tolist() == [1, 2, 3, 4]
    rt.release(res.leases)


def test_leased_blocks_are_never_reused_while_leased(rt, host):
    x = np.random.default_rng(4).standard_normal(100_000).astype(np.float32)
    xref = host.ref(x)
    first = run(rt, "mul", xref, 2.0)
    second = run(rt, "mul", xref, 3.0)  # a fresh block: the first one is still leased
    assert first.outputs[0].storage.name != second.outputs[0].storage.name
    np.testing.assert_array_equal(host.read(first.outputs[0]), x * np.float32(2.0))
    rt.release(first.leases + second.leases)


def test_a_tensor_kept_from_an_earlier_call_is_copied_under_a_lease(rt, host):
    x = np.arange(100_000, dtype=np.float32)
    assert run(rt, "t.stash", host.ref(x)).outputs == []  # None: no output
    assert rt.arena.stats().in_use_bytes == 0  # its block went back although the op kept a view
    res = run(rt, "t.stash", host.ref(x))  # returns the stale tensor: never described in place
    assert len(res.leases) == 1 and rt.arena.stats().in_use_bytes == size_class(x.nbytes)
    rt.release(res.leases)


def test_cancelled_after_compute_gives_the_block_back(rt, host):
    checks = []

    def cancelled_on_fourth_check():  # admitted, decoded, computed, encoded: gone by the last
        checks.append(1)
        return len(checks) >= 4

    with pytest.raises(Cancelled):
        run(rt, "mul", host.ref(np.ones(100_000, np.float32)), 2.0, is_cancelled=cancelled_on_fourth_check)
    assert len(checks) == 4 and rt.leases.count == 0 and rt.arena.stats().in_use_bytes == 0


def test_ctx_empty_dtypes_and_small_sizes(rt):
    assert run(rt, "t.empty_info", n=100_000, dtype="bfloat16").outputs[0] == ["torch.bfloat16", [100_000], "cpu"]
    allocs = allocations(rt)
    assert run(rt, "t.empty_info", n=4, dtype="int64").outputs[0] == ["torch.int64", [4], "cpu"]
    assert allocations(rt) == allocs  # below the inline threshold: plain torch.empty
    with pytest.raises(OpFailed) as info:
        run(rt, "t.empty_info", n=4, dtype="float8")
    assert info.value.exception_type == "TypeError" and "float8" in info.value.message
    assert rt.arena.stats().in_use_bytes == 0


def test_ctx_empty_without_a_dispatcher_is_torch_empty():
    t = OpContext(torch.device("cpu")).empty([2, 3], np.dtype("float16"))
    assert t.shape == (2, 3) and t.dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_ctx_empty_on_a_cuda_worker_is_on_the_device():
    rt = build_runtime(WorkerOptions(device="cuda", run_id=session_run("opoutcuda")))
    try:
        rt.registry.add(make_spec(empty_info, "t.empty_info"))
        info = rt.dispatcher.execute(Call(op="t.empty_info", attrs={"n": 1 << 20, "dtype": "float32"}))
        assert info.outputs[0][2].startswith("cuda") and rt.arena.stats().in_use_bytes == 0
    finally:
        rt.close()


# ---------------------------------------------------------------------------------------------------
# built-in ops: the same bits as torch's own allocation, and the same as NumPy


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


RNG = np.random.default_rng(5)
F = RNG.standard_normal((256, 300)).astype(np.float32)
G = RNG.standard_normal((256, 300)).astype(np.float32)
I32 = RNG.integers(-100, 100, (256, 300)).astype(np.int32)
F[0, :3] = [np.nan, -0.0, np.inf]  # special values take the same path too

BUILTINS = [
    ("add", (F, G), {}, lambda: F + G),
    ("add", (I32, 2.5), {}, lambda: I32 + np.float32(2.5)),
    ("sub", (F, G[0]), {}, lambda: F - G[0]),
    ("mul", (F, G), {}, lambda: F * G),
    ("div", (F, G), {}, lambda: F / G),
    ("div", (I32, I32[:1] + 101), {}, lambda: (I32 / (I32[:1] + 101)).astype(np.float32)),
    ("div", (I32, 7), {"rounding_mode": "floor"}, lambda: I32 // 7),
    ("relu", (F,), {}, lambda: np.maximum(F, 0)),
    ("relu", (I32,), {}, lambda: np.maximum(I32, 0)),
    ("gelu", (G,), {}, None),
    ("gelu", (G,), {"approximate": "tanh"}, None),
    ("matmul", (G, G.T.copy()), {}, lambda: G @ G.T),
    ("matmul", (G.reshape(2, 128, 300), G.T.copy()), {}, lambda: G.reshape(2, 128, 300) @ G.T),
    ("softmax", (G,), {"dim": 0}, lambda: np.exp(G) / np.exp(G).sum(0, keepdims=True)),
    ("cast", (F,), {"dtype": "float64"}, lambda: F.astype(np.float64)),
    ("cast", (F,), {"dtype": "bfloat16"}, None),
    ("cast", (G * 100,), {"dtype": "int16"}, lambda: (G * 100).astype(np.int16)),
]


@pytest.mark.parametrize("op,inputs,attrs,numpy", BUILTINS, ids=[f"{c[0]}-{i}" for i, c in enumerate(BUILTINS)])
def test_builtin_ops_write_in_place_with_the_same_bits(rt, host, op, inputs, attrs, numpy):
    refs = [host.ref(x) if isinstance(x, np.ndarray) else x for x in inputs]
    allocs = allocations(rt)
    res = run(rt, f"t.traced.{op}", *refs, **attrs)
    out = res.outputs[0]
    assert worker_segment(rt, out) and allocations(rt) == allocs + 1 and computed_in_place(rt, out)
    got = tensors.to_torch(out, MappingCache()).clone()
    # called directly (no ctx), the op lets torch allocate its result: today's path
    direct = getattr(builtin_ops, op)(*[torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in inputs],
                                      **attrs)
    assert got.dtype == direct.dtype and got.shape == direct.shape and _bits(got) == _bits(direct)
    if numpy is not None:
        np.testing.assert_allclose(got.numpy(), numpy(), rtol=1e-4, atol=1e-4)
    rt.release(res.leases)
    assert rt.arena.stats().in_use_bytes == 0


def test_non_contiguous_inputs_keep_torch_allocating(rt, host):
    # With a transposed input torch lays its result out like the input; written into a contiguous
    # `out` instead, floor division gives this NaN the other sign bit. Same bits as today's path:
    x = np.random.default_rng(6).standard_normal((300, 200)) * 10
    x[0, :3] = [np.nan, -0.0, np.inf]
    xt = TensorRef("float64", (200, 300), host.ref(x).storage, (8, 1600))  # x.T, described in place
    res = run(rt, "div", xt, 3.0, rounding_mode="floor")
    got = tensors.to_torch(res.outputs[0], MappingCache()).clone()
    assert _bits(got) == _bits(builtin_ops.div(torch.from_numpy(x).T, 3.0, rounding_mode="floor"))
    with np.errstate(invalid="ignore"):  # inf // 3 is NaN in NumPy, as in torch
        np.testing.assert_array_equal(got.numpy(), np.floor_divide(x.T, 3.0))
    rt.release(res.leases)


# ---------------------------------------------------------------------------------------------------
# end to end: a real worker process, a real Client


def test_mul_through_a_real_worker():
    from sidecar.host import Client

    run_name = run_id()
    worker = start_worker("--device", "cpu", "--run-id", run_name, "--threads", "1")
    try:
        with Client(worker.address, run_id=run_name, timeout=30) as c:
            x = c.empty(MIB4, "float32")
            x[:] = np.random.default_rng(7).standard_normal(MIB4).astype(np.float32)
            y2 = c.call("mul", x, 2.0)
            y3 = c.call("mul", x, 3.0)  # y2's block is still leased: y3 must not land in it
            np.testing.assert_array_equal(y2, x * np.float32(2.0))
            np.testing.assert_array_equal(y3, x * np.float32(3.0))
            out = c.empty(MIB4, "float32")
            assert c.call("mul", x, 4.0, out=out) is out
            np.testing.assert_array_equal(out, x * np.float32(4.0))
            del y2, y3
            gc.collect()
            assert c.release() == (2, [])
            del x, out
    finally:
        assert worker.stop() == 0
    assert_run_clean(run_name)


FULL_SHM = """
    import json
    import numpy as np
    from sidecar.protocol.refs import InlineStorage, TensorRef
    from sidecar.protocol.calls import Call, OutputSpec, Placement
    from sidecar.worker.runtime import WorkerOptions, build_runtime
    x = np.arange(1 << 19, dtype=np.float32)  # 2 MiB: more than the whole 1 MiB /dev/shm
    ref = TensorRef("float32", x.shape, InlineStorage(x.tobytes()))
    rt = build_runtime(WorkerOptions(device="cpu", run_id="tfull"))  # a private /dev/shm: no one to share with
    out = {}
    res = rt.dispatcher.execute(Call(op="mul", inputs=[ref, 2.0], output=OutputSpec(Placement.INLINE)))
    out["inline_ok"] = np.array_equal(np.frombuffer(res.outputs[0].storage.data, np.float32), x * 2)
    try:
        rt.dispatcher.execute(Call(op="mul", inputs=[ref, 2.0]))
    except Exception as e:
        out["auto"] = [e.kind.value, e.device]
    out["in_use"] = rt.arena.stats().in_use_bytes
    rt.close()
    print(json.dumps(out))
"""


def test_a_full_dev_shm_falls_back_to_private_memory():
    """In a 1 MiB tmpfs over /dev/shm (a private mount namespace): ctx.empty cannot get a block, the
    op computes in private memory as before; an INLINE output gets through, an AUTO one is the same
    clean OutOfMemory it always was."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("mounting a private tmpfs needs root and unshare(1)")
    if subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("unshare -m not permitted here")
    cmd = ["unshare", "-m", "sh", "-c",
           'mount --make-rprivate / && mount -t tmpfs -o size=1m,mode=1777 tmpfs /dev/shm && exec "$0" -c "$1"',
           sys.executable, textwrap.dedent(FULL_SHM)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"inline_ok": True, "auto": ["OUT_OF_MEMORY", "shm"], "in_use": 0}
