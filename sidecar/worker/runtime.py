"""A worker's parts wired together; every transport (gRPC, the Erlang port) builds one of these.

`build_runtime` loads the ops (built-ins, `--ops` modules, debug ops when asked), picks the device,
creates the arena / mapping cache / lease table / telemetry hub / dispatcher, then runs the ops
modules' start-up hooks, so that by the time a transport prints its ready line the first call is warm.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from sidecar import _native
from sidecar.dataplane.arena import Arena
from sidecar.dataplane.mapcache import MappingCache
from sidecar.protocol import limits
from sidecar.worker import hardware as hardware_mod
from sidecar.worker.devices import select_device
from sidecar.worker.dispatcher import Dispatcher
from sidecar.worker.leases import LeaseTable
from sidecar.worker.registry import OpSpec, Registry
from sidecar.worker.resources import ResourceTable
from sidecar.worker.sessions import SessionTable
from sidecar.worker.telemetry import Telemetry, gpu_memory, rss_bytes

log = logging.getLogger(__name__)

BUILTIN_OPS = "sidecar.worker.builtin_ops"
# The longest the janitor sleeps: how soon a dead client's leases and unlinked input segments go.
JANITOR_INTERVAL_S = 1.0
DEBUG_OPS = "sidecar.worker.debug_ops"


@dataclass
class WorkerOptions:
    device: str = "auto"
    ops_modules: list[str] = field(default_factory=list)
    debug_ops: bool = False
    max_concurrency: int = limits.DEFAULT_MAX_CONCURRENCY
    max_queue: int = limits.DEFAULT_MAX_QUEUE
    run_id: str | None = None
    inline_threshold: int = limits.DEFAULT_INLINE_THRESHOLD
    # an unreleased lease is reclaimed (unlinked, never reused) after this, or beyond this many
    lease_ttl_s: float = limits.DEFAULT_LEASE_TTL_S
    max_leases: int = limits.DEFAULT_MAX_LEASES
    map_cache_share: float = 0.25  # the input mapping cache keeps at most this share of /dev/shm mapped
    # Outputs that are views of a host's input (identity, reshape/transpose views) are returned as
    # descriptors of the host's own segment: zero copies, no lease. Off by default: the host must
    # then keep its input memory alive (and unchanged) for as long as it uses such outputs.
    alias_inputs: bool = False
    # a session's state (ctx.session) is freed after this long without a call (--session-ttl)
    session_ttl_s: float = limits.DEFAULT_SESSION_TTL_S


class Runtime:
    def __init__(self, options: WorkerOptions, device: torch.device, registry: Registry, arena: Arena,
                 cache: MappingCache, leases: LeaseTable, telemetry: Telemetry) -> None:
        self.options = options
        self.device = device
        self.registry = registry
        self.arena = arena
        self.cache = cache
        self.leases = leases
        self.telemetry = telemetry
        self.dispatcher = Dispatcher(self)
        # State beyond one call: resident objects (Load/Unload) and session state (ctx.session).
        self.resources = ResourceTable(device, self.dispatcher.structured)
        self.sessions = SessionTable(options.session_ttl_s)
        telemetry.memory_source = self.memory_sample
        self._closed = False
        self._stop = threading.Event()
        self._janitor: threading.Thread | None = None

    # -- what transports ask -------------------------------------------------------------------------

    def hardware(self) -> dict[str, Any]:
        return hardware_mod.detect(str(self.device))

    def list_ops(self) -> list[OpSpec]:
        return self.registry.specs()

    def release(self, ids: list[str]) -> tuple[int, list[str]]:
        return self.leases.release(ids)

    # Resources and sessions: records of sidecar.v1.ResourceInfo / UnloadResponse / ResourceList.

    def load(self, name: str, loader: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        return self.resources.load(name, loader, kwargs)

    def unload(self, name: str) -> dict[str, Any]:
        return self.resources.unload(name)

    def list_resources(self) -> dict[str, Any]:
        return {"resources": self.resources.infos(), "sessions": self.sessions.infos()}

    def close_session(self, session_id: str) -> bool:
        return self.sessions.close(session_id)

    @property
    def tainted(self) -> str | None:
        """Why the device needs a fresh process (the transport answers, then exits 70); None if fine."""
        return self.dispatcher.tainted

    def memory_sample(self) -> dict[str, Any]:
        stats = self.arena.stats()
        return {"rss_bytes": rss_bytes(), "arena_reserved_bytes": stats.reserved_bytes,
                "arena_in_use_bytes": stats.in_use_bytes, "leases": self.leases.count,
                "gpus": gpu_memory([self.device.index or 0]) if self.device.type == "cuda" else []}

    # -- lifetime ------------------------------------------------------------------------------------

    def start_janitor(self) -> None:
        """Reclaim forgotten leases (TTL, cap: calls expire them too) and those of clients whose
        process has ended, and drop cached mappings of segments their owners unlinked, even while
        no call arrives."""
        if self._janitor is not None:
            return
        interval = min(max(self.options.lease_ttl_s / 4, 0.05), JANITOR_INTERVAL_S)

        def loop() -> None:
            while not self._stop.wait(interval):
                for chore in (self.leases.expire, self.leases.drop_dead_owners, self.cache.sweep,
                              self.sessions.expire):
                    try:
                        chore()
                    except Exception:
                        log.exception("janitor: %s failed", getattr(chore, "__name__", chore))

        self._janitor = threading.Thread(target=loop, name="sidecar-leases", daemon=True)
        self._janitor.start()

    def close(self) -> None:
        """Frees every lease and unlinks every segment of the worker's arena (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._janitor is not None and self._janitor is not threading.current_thread():
            self._janitor.join(timeout=2)
        self.leases.close()
        self.sessions.clear()
        self.resources.close()
        self.telemetry.close()
        self.cache.clear()
        self.arena.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def build_runtime(opts: WorkerOptions) -> Runtime:
    # A segment truncated under a mapping raises SIGBUS when touched: name it on stderr first (for the
    # pool's crash report). Installed after faulthandler (enabled at interpreter start or by the
    # template's child), so that this handler sees the fault first and then chains to it.
    _native.install_sigbus_handler()
    device = select_device(opts.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    registry = Registry()
    registry.load_module(BUILTIN_OPS)
    if opts.debug_ops:
        registry.load_module(DEBUG_OPS)
    for module in opts.ops_modules:
        registry.load_module(module)
    pin_arena: dict[str, Any] = {}
    pin_inputs: dict[str, Any] = {}
    if device.type == "cuda":  # pinned shared memory: copies between it and the GPU run at full speed
        from sidecar.dataplane import cuda_ipc

        def pin(seg: Any) -> bool:
            return cuda_ipc.register_host_memory(seg, device.index or 0)

        pin_arena = {"on_create": pin, "on_destroy": cuda_ipc.unregister_host_memory}
        pin_inputs = {"on_map": pin, "on_unmap": cuda_ipc.unregister_host_memory}
    cache = MappingCache(shm_share=opts.map_cache_share, **pin_inputs)
    runtime = Runtime(opts, device, registry, Arena(opts.run_id, **pin_arena), cache,
                      LeaseTable(opts.lease_ttl_s, opts.max_leases), Telemetry())
    try:
        registry.run_startup_hooks(runtime)
    except BaseException:
        runtime.close()
        raise
    runtime.start_janitor()
    return runtime
