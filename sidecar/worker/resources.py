"""Resident objects ("resources"): what a registered loader built, kept in a worker across calls.

A user module declares loaders (`@sidecar.resource("encoder")`); the host asks a worker to run one
(`Load`: a name, the loader, its keyword arguments) and ops read the result with
`ctx.resource("encoder")`. The worker measures what each load cost (RSS delta; on CUDA the
`torch.cuda.memory_allocated` delta) and what an `Unload` gave back (CUDA: the caching allocator's
cache is emptied, so the memory goes back to the driver, not just to torch).

Only declared loaders run: a loader is named by its declared name (from a module the worker loaded
with --ops, or one imported for an earlier load) or by "package.module.function", whose module is
imported and whose function must carry the declaration. Anything else is RESOURCE_FAILED with the
close names. A loader that raises gives RESOURCE_FAILED (its exception type and traceback) or, when
it ran out of memory, OUT_OF_MEMORY with the figures; the worker stays up either way and nothing of
the failed load stays resident.

The host pool remembers each load as a recipe and replays it on replacement workers
(`sidecar.host.resources`); a worker holds the objects only.
"""
from __future__ import annotations

import ctypes
import gc
import importlib
import inspect
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from sidecar.errors import (
    InvalidArgument,
    ResourceFailed,
    SidecarError,
    close_names,
    shorten,
)
from sidecar.worker.telemetry import rss_bytes

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

# A loader that declares a parameter of this name receives the worker's torch.device.
DEVICE_PARAM = "device"
MAX_NAME = 200

# Declared loaders by declared name: (function, defining module).
_DECLARED: dict[str, Callable[..., Any]] = {}
_DECL_LOCK = threading.Lock()


def resource(name: str) -> Callable[[F], F]:
    """Declare `fn` as the loader `name` (`@sidecar.resource("encoder")`).

    `fn(**kwargs)` builds the object (a torch module, a tokenizer, a dict of tensors); a parameter
    named `device` receives the worker's torch.device. What it returns stays resident in the
    worker until unloaded; ops read it with `ctx.resource(<the name given to Load>)`.
    """
    if not name or not isinstance(name, str):
        raise ValueError("a resource loader needs a non-empty string name")

    def deco(fn: F) -> F:
        with _DECL_LOCK:
            old = _DECLARED.get(name)
            if old is not None and _qualified(old) != _qualified(fn):
                raise ValueError(f"resource loader {name!r} is already declared by {_qualified(old)}")
            _DECLARED[name] = fn
        fn.__sidecar_resource__ = name  # type: ignore[attr-defined]
        return fn
    return deco


def _qualified(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


def find_loader(loader: str) -> Callable[..., Any]:
    """The declared loader named `loader` (its declared name, or "module.function")."""
    if not isinstance(loader, str) or not loader or len(loader) > MAX_NAME:
        raise InvalidArgument(f"a loader is named by a non-empty string of at most {MAX_NAME} characters, "
                              f"got {shorten(loader)}", field="loader")
    with _DECL_LOCK:
        fn = _DECLARED.get(loader)
    if fn is not None:
        return fn
    module, _, attr = loader.rpartition(".")
    if module:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise _unknown_loader(loader, f"its module {module!r} cannot be imported: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the module itself failed while running
            raise ResourceFailed(f"loader {loader!r}: importing {module!r} failed: {type(exc).__name__}: {exc}",
                                 loader=loader, cause="loader_failed", exception_type=type(exc).__name__,
                                 traceback=traceback.format_exc()) from None
        fn = getattr(mod, attr, None)
        if fn is not None and getattr(fn, "__sidecar_resource__", None) is not None:
            return fn  # type: ignore[no-any-return]
        if fn is not None:
            raise _unknown_loader(loader, f"{module}.{attr} is not declared with @sidecar.resource")
    raise _unknown_loader(loader, "no loader of that name is declared")


def _unknown_loader(loader: str, why: str) -> ResourceFailed:
    with _DECL_LOCK:
        known = list(_DECLARED) + [_qualified(f) for f in _DECLARED.values()]
    return ResourceFailed(f"unknown loader {shorten(loader)}: {why}", loader=loader, cause="unknown_loader",
                          close_names=close_names(loader, known))


@dataclass
class Resident:
    """One loaded object and what it cost (a `sidecar.v1.ResourceInfo` record, `info()`)."""

    name: str
    loader: str
    kwargs: dict[str, Any]
    obj: Any
    device: str
    host_bytes: int
    device_bytes: int
    load_ns: int
    pid: int

    def info(self, already_loaded: bool = False) -> dict[str, Any]:
        return {"name": self.name, "loader": self.loader, "device": self.device,
                "type": f"{type(self.obj).__module__}.{type(self.obj).__qualname__}",
                "host_bytes": self.host_bytes, "device_bytes": self.device_bytes, "load_ns": self.load_ns,
                "pid": self.pid, "already_loaded": already_loaded}


class ResourceTable:
    """The resources of one worker. Loads and unloads are serialised; ops read without a lock."""

    def __init__(self, device: Any, structured: Callable[[BaseException, str], SidecarError]) -> None:
        self.device = device  # torch.device of the worker
        self._structured = structured  # the dispatcher's exception mapping (OOM figures, taint)
        self._items: dict[str, Resident] = {}
        self._lock = threading.Lock()

    # -- ops -----------------------------------------------------------------------------------------

    def get(self, name: str) -> Any:
        """The object loaded as `name` (`ctx.resource(name)`); RESOURCE_FAILED when it is not loaded."""
        item = self._items.get(name)
        if item is None:
            loaded = sorted(self._items)
            raise ResourceFailed(
                f"resource {shorten(name)} is not loaded on this worker (loaded: {', '.join(loaded) or 'none'})",
                resource=str(name), cause="not_loaded", close_names=close_names(str(name), loaded))
        return item.obj

    def names(self) -> list[str]:
        return sorted(self._items)

    def infos(self) -> list[dict[str, Any]]:
        return [self._items[n].info() for n in sorted(self._items)]

    # -- the host's requests -------------------------------------------------------------------------

    def load(self, name: str, loader: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Runs the loader and keeps its object as `name`; returns its `ResourceInfo` record.

        The same name with the same recipe is a no-op (`already_loaded`: a replayed load); the same
        name with another recipe is refused (unload it first)."""
        if not isinstance(name, str) or not name or len(name) > MAX_NAME:
            raise InvalidArgument(f"a resource is named by a non-empty string of at most {MAX_NAME} characters, "
                                  f"got {shorten(name)}", field="name")
        kwargs = dict(kwargs)
        with self._lock:
            old = self._items.get(name)
            if old is not None:
                if old.loader == loader and old.kwargs == kwargs:
                    return old.info(already_loaded=True)
                raise ResourceFailed(f"resource {name!r} is already loaded (by {old.loader}) with another recipe; "
                                     f"unload it first", resource=name, loader=loader, cause="already_loaded")
            fn = find_loader(loader)
            item = self._run(name, loader, fn, kwargs)
            self._items[name] = item
        log.info("loaded resource %r (%s) on %s: %+d host bytes, %+d device bytes in %.1f ms", name, loader,
                 item.device, item.host_bytes, item.device_bytes, item.load_ns / 1e6)
        return item.info()

    def _run(self, name: str, loader: str, fn: Callable[..., Any], kwargs: dict[str, Any]) -> Resident:
        call_kwargs = dict(kwargs)
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        if DEVICE_PARAM in params and DEVICE_PARAM not in call_kwargs:
            call_kwargs[DEVICE_PARAM] = self.device
        before = _memory(self.device)
        t0 = time.perf_counter_ns()
        try:
            obj = fn(**call_kwargs)
        except BaseException as exc:  # SystemExit from a loader too: the worker stays up
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise self._failed(exc, name, loader) from None
        load_ns = time.perf_counter_ns() - t0
        if obj is None:
            raise ResourceFailed(f"loader {loader!r} returned None for resource {name!r} (return the object to keep)",
                                 resource=name, loader=loader, cause="loader_failed")
        _synchronize(self.device)
        after = _memory(self.device)
        return Resident(name, loader, kwargs, obj, _device_of(obj, self.device), after[0] - before[0],
                        after[1] - before[1], load_ns, os.getpid())

    def _failed(self, exc: BaseException, name: str, loader: str) -> SidecarError:
        err = self._structured(exc, f"load {name}")
        err.fields.pop("op", None)
        if isinstance(err, ResourceFailed) or err.kind.value in ("OUT_OF_MEMORY", "DEVICE_UNAVAILABLE"):
            err.fields.setdefault("resource", name)
            err.fields.setdefault("loader", loader)
            if err.kind.value == "OUT_OF_MEMORY":
                err.message = f"loading resource {name!r} ({loader}) ran out of memory: {err.message}"
            return err
        # Anything else the loader raised: RESOURCE_FAILED with what it raised.
        etype = err.fields.get("exception_type") or type(exc).__name__
        tb = err.fields.get("traceback") or "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        gc.collect()  # what the failed load allocated goes now
        return ResourceFailed(f"loader {loader!r} failed for resource {name!r}: {err.message}", resource=name,
                              loader=loader, cause="loader_failed", exception_type=str(etype), traceback=str(tb))

    def unload(self, name: str) -> dict[str, Any]:
        """Drops `name` and gives its memory back; an `UnloadResponse` record (`unloaded` False when
        nothing of that name was resident). An op still using the object keeps it until it returns."""
        with self._lock:
            before = _memory(self.device)
            item = self._items.pop(name, None)
            if item is None:
                return {"unloaded": False, "host_bytes_freed": 0, "device_bytes_freed": 0,
                        "device_reserved_freed": 0}
            del item
            after = _release_memory(self.device)
        log.info("unloaded resource %r: %d host bytes, %d device bytes freed", name, before[0] - after[0],
                 before[1] - after[1])
        return {"unloaded": True, "host_bytes_freed": before[0] - after[0], "device_bytes_freed": before[1] - after[1],
                "device_reserved_freed": before[2] - after[2]}

    def close(self) -> None:
        with self._lock:
            self._items.clear()


# ---------------------------------------------------------------------------------------------------
# memory figures


def _memory(device: Any) -> tuple[int, int, int]:
    """(RSS, CUDA bytes allocated, CUDA bytes reserved) of this process on `device` (0s off CUDA)."""
    gc.collect()
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        index = device.index or 0
        return rss_bytes(), int(torch.cuda.memory_allocated(index)), int(torch.cuda.memory_reserved(index))
    return rss_bytes(), 0, 0


def _synchronize(device: Any) -> None:
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _release_memory(device: Any) -> tuple[int, int, int]:
    """Frees what nothing references any more and hands it back: the CUDA cache to the driver, the
    C heap's free pages to the kernel (glibc malloc_trim), then measures."""
    gc.collect()
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    _malloc_trim()
    return _memory(device)


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the allocator keeps its pages
        log.debug("malloc_trim is not available; freed heap pages stay with the process")


def _device_of(obj: Any, default: Any) -> str:
    """Where a loaded object lives: its first parameter's / tensor's device, else the worker's."""
    try:
        import torch

        if isinstance(obj, torch.Tensor):
            return str(obj.device)
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                return str(p.device)
            for b in obj.buffers():
                return str(b.device)
        if isinstance(obj, Mapping):
            for v in obj.values():
                if isinstance(v, torch.Tensor):
                    return str(v.device)
    except Exception:  # noqa: BLE001 - an exotic object: say the worker's device
        log.debug("cannot tell where a %s lives", type(obj).__name__)
    return str(default)
