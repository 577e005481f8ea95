"""A pool's state beyond one call: resources loaded on its workers, replayed on replacements, and
calls addressed to particular workers (broadcast, pinned workers).

- `load(name, loader, **kwargs)` remembers the *recipe* (loader and arguments, never the bytes) and
  runs it on every live worker (serving and spare; `gpu=` narrows it to the workers placed on that
  GPU). All or nothing: when a worker refuses (its loader raised, a bad checkpoint, out of memory)
  the workers that loaded it unload it again, the recipe is forgotten and the error is raised, with
  the worker named. A worker killed from outside during a load is no failure: its replacement
  replays the recipe like any other.
- Every new worker of the pool (forked from the template, a spare, started cold) replays the
  recipes before the pool routes a call to it (`restore`, called by the shell's launch between
  the handshake and `launched`); a recipe added or removed meanwhile is caught by the version check.
  A worker that cannot restore is killed, reported (`restore_failed`, then a start failure with
  classification `restore_failed`, which counts towards the start-up breaker) and never used.
- `unload(name)` forgets the recipe and frees the resource on every worker (memory figures summed).
- `broadcast(op, ...)` runs one call on every serving worker and returns each one's result or error;
  `workers()` are handles that pin calls to one worker.

Events (the pool's bus, so the metrics timeline shows them): resource_loaded, resource_unloaded,
resource_restored, restore_failed (see `sidecar.host.events`).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sidecar.errors import InvalidArgument, ResourceFailed, SidecarError, WorkerCrashed
from sidecar.host import events
from sidecar.host.client import ClientClosed, Result
from sidecar.host.scheduler import PoolClosed
from sidecar.host.supervisor import Worker

if TYPE_CHECKING:
    from sidecar.host.pool import Pool

log = logging.getLogger(__name__)

__all__ = ["PoolResources", "PoolWorker", "Recipe", "RestoreFailed", "WorkerResult"]


@dataclass(frozen=True)
class Recipe:
    """What the pool asked to load: enough to load it again on a fresh worker."""

    name: str
    loader: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    gpu: str | None = None  # only workers placed on this GPU (a CUDA_VISIBLE_DEVICES entry); None: all

    def applies_to(self, worker: Worker) -> bool:
        return self.gpu is None or worker.gpu == self.gpu


@dataclass(frozen=True)
class WorkerResult:
    """One worker's answer to a broadcast (or a load): `value` or `error`."""

    slot: int
    pid: int
    value: Any = None
    error: SidecarError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class RestoreFailed(Exception):
    """A new worker could not replay a recipe (the shell kills it and reports a failed start)."""

    def __init__(self, recipe: Recipe, error: SidecarError) -> None:
        super().__init__(f"restoring resource {recipe.name!r} ({recipe.loader}) failed: {error.message}")
        self.recipe = recipe
        self.error = error


class PoolWorker:
    """A handle on one serving worker of a pool (`pool.workers()`): calls pinned to it. Once it no
    longer serves (dead, replaced, recycled) its calls fail with WORKER_CRASHED (not sent)."""

    def __init__(self, pool: Pool, worker: Worker) -> None:
        self._pool = pool
        self._worker = worker
        slot = worker.slot
        self.slot = slot.index if slot is not None else -1
        self.pid = worker.pid
        self.address = worker.address
        self.gpu = worker.gpu

    @property
    def serving(self) -> bool:
        with self._pool._lock:
            return self._pool._sup.serves(self._worker)

    def call(self, op: str, *inputs: Any, timeout: float | None = None, **kwargs: Any) -> Any:
        """Runs `op` on this worker only (see `Client.call`)."""
        self._pool._check_process()
        return self._pool._scheduler.invoke_on(self._worker, "call", op, inputs, timeout, kwargs)

    def execute(self, op: str, *inputs: Any, timeout: float | None = None, **kwargs: Any) -> Result:
        self._pool._check_process()
        return self._pool._scheduler.invoke_on(  # type: ignore[no-any-return]
            self._worker, "execute", op, inputs, timeout, kwargs)

    def resources(self) -> dict[str, Any]:
        """This worker's ListResources: {"resources": [...], "sessions": [...]}."""
        return self._worker.client.resources()  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<PoolWorker slot={self.slot} pid={self.pid}>"


class PoolResources:
    """The recipes of one pool and the requests that go to several of its workers (module doc).
    It reads the pool's state machine under the pool's lock, like the scheduler."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self.recipes: dict[str, Recipe] = {}
        self.version = 0  # bumped by every change of `recipes` (a restore in progress starts over)
        self._op_context: dict[str, bool] | None = None
        self._op_lock = threading.Lock()

    # -- load / unload ---------------------------------------------------------------------------

    def load(self, name: str, loader: str, kwargs: Mapping[str, Any], *, gpu: str | int | None = None,
             timeout: float | None = None) -> list[dict[str, Any]]:
        pool = self._pool
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"a resource needs a non-empty string name, got {name!r}", field="name")
        recipe = Recipe(name, str(loader), {k: _wire(v) for k, v in kwargs.items()},
                        None if gpu is None else str(gpu))
        t0 = time.monotonic()
        with pool._cond:
            if pool._sup.closing:
                raise PoolClosed("the pool is closed; load refused", resource=name)
            old = self.recipes.get(name)
            if old is not None and old != recipe:
                raise ResourceFailed(f"resource {name!r} is already loaded in this pool (by {old.loader}) with "
                                     f"another recipe; unload it first", resource=name, loader=recipe.loader,
                                     cause="already_loaded")
            self.recipes[name] = recipe
            self.version += 1
            workers = [w for w in self._live() if recipe.applies_to(w)]
        results = _each(workers, lambda w: w.client.load(name, recipe.loader, timeout=timeout, **recipe.kwargs))
        failed = [(w, r) for w, r in zip(workers, results, strict=True) if isinstance(r, BaseException)
                  and not self._killed_from_outside(w, r)]
        if failed:
            worker, first = failed[0]
            with pool._cond:
                if self.recipes.get(name) == recipe:
                    del self.recipes[name]
                    self.version += 1
            loaded = [w for w, r in zip(workers, results, strict=True) if not isinstance(r, BaseException)
                      and not r.get("already_loaded")]
            _each(loaded, lambda w: w.client.unload(name))
            if isinstance(first, SidecarError):
                first.message = f"worker pid {worker.pid}: {first.message}"
                first.fields.setdefault("resource", name)
                first.fields.setdefault("loader", recipe.loader)
            raise first
        infos = [dict(r, slot=_label(w)) for w, r in zip(workers, results, strict=True) if not isinstance(r, BaseException)]
        pool.events_bus.emit(events.resource_loaded(
            name, recipe.loader, [int(i["pid"]) for i in infos], time.monotonic() - t0,
            sum(int(i["host_bytes"]) for i in infos), sum(int(i["device_bytes"]) for i in infos)))
        return infos

    def unload(self, name: str) -> dict[str, Any]:
        pool = self._pool
        with pool._cond:
            recipe = self.recipes.pop(name, None)
            if recipe is None:
                raise ResourceFailed(f"resource {name!r} is not loaded in this pool (loaded: "
                                     f"{', '.join(sorted(self.recipes)) or 'none'})", resource=name, cause="not_loaded")
            self.version += 1
            workers = [w for w in self._live() if recipe.applies_to(w)]
        results = _each(workers, lambda w: w.client.unload(name))
        done = [r for r in results if not isinstance(r, BaseException)]
        report: dict[str, Any] = {"name": name, "workers": len(done),
                  "host_bytes_freed": sum(int(r["host_bytes_freed"]) for r in done),
                  "device_bytes_freed": sum(int(r["device_bytes_freed"]) for r in done),
                  "device_reserved_freed": sum(int(r["device_reserved_freed"]) for r in done),
                  "per_worker": [dict(r, pid=w.pid, slot=_label(w)) for w, r in zip(workers, results, strict=True)
                                 if not isinstance(r, BaseException)]}
        pool.events_bus.emit(events.resource_unloaded(name, len(done), report["host_bytes_freed"],
                                                      report["device_bytes_freed"]))
        return report

    def listing(self) -> list[dict[str, Any]]:
        """Every recipe and, per serving or spare worker, what it holds of it."""
        pool = self._pool
        with pool._cond:
            recipes = list(self.recipes.values())
            workers = self._live()
        answers = _each(workers, lambda w: w.client.resources())
        held: dict[str, list[dict[str, Any]]] = {}
        for w, a in zip(workers, answers, strict=True):
            if isinstance(a, BaseException):
                continue
            for info in a.get("resources", []):
                held.setdefault(info["name"], []).append(dict(info, slot=_label(w)))
        return [{"name": r.name, "loader": r.loader, "kwargs": dict(r.kwargs), "gpu": r.gpu,
                 "workers": held.get(r.name, [])} for r in recipes]

    def _live(self) -> list[Worker]:
        """Serving and spare workers that are up (the caller holds the pool's lock)."""
        sup = self._pool._sup
        return [s.worker for s in sup.serving + sup.spares if s.worker is not None and not s.worker.retiring]

    def _killed_from_outside(self, worker: Worker, exc: BaseException) -> bool:
        """A load that failed because its worker died of something it did not cause (SIGKILL from
        outside): the replacement replays the recipe, so the load stands."""
        if not isinstance(exc, (WorkerCrashed, ClientClosed)):
            return False  # the worker's own answer
        info = worker.proc.wait_exit(self._pool.settings.crash_detect_s)
        return info is not None and not info.blames_work

    # -- replay on new workers -------------------------------------------------------------------

    def restore(self, worker: Worker, done: dict[str, Recipe]) -> int:
        """Makes `worker` hold exactly the recipes that apply to it (`done`: what it holds so far);
        returns the version of the recipes it now matches. Raises RestoreFailed."""
        pool = self._pool
        with pool._cond:
            version = self.version
            wanted = {r.name: r for r in self.recipes.values() if r.applies_to(worker)}
        for name in [n for n, r in done.items() if wanted.get(n) != r]:
            worker.client.unload(name)
            del done[name]
        for name, recipe in wanted.items():
            if name in done:
                continue
            try:
                worker.client.load(name, recipe.loader, timeout=pool.settings.start_timeout, **recipe.kwargs)
            except SidecarError as err:
                raise RestoreFailed(recipe, err) from err
            done[name] = recipe
        return version

    # -- addressing --------------------------------------------------------------------------------

    def broadcast(self, op: str, inputs: tuple[Any, ...], timeout: float | None,
                  kwargs: dict[str, Any]) -> list[WorkerResult]:
        pool = self._pool
        with pool._cond:
            if pool._sup.closing:
                raise PoolClosed("the pool is closed", op=op)
            workers = pool._sup.serving_workers()
        results = _each(workers, lambda w: pool._scheduler.invoke_on(w, "call", op, inputs, timeout, kwargs))
        out = []
        for w, r in zip(workers, results, strict=True):
            if isinstance(r, SidecarError):
                out.append(WorkerResult(_label(w), w.pid, error=r))
            elif isinstance(r, BaseException):
                raise r  # a bug of ours, not a worker's answer
            else:
                out.append(WorkerResult(_label(w), w.pid, value=r))
        return out

    def workers(self) -> list[PoolWorker]:
        pool = self._pool
        with pool._cond:
            return [PoolWorker(pool, w) for w in pool._sup.serving_workers()]

    def takes_context(self, op: str) -> bool:
        """Whether `op` receives a context (ListOps; True when unknown: it may use session state)."""
        with self._op_lock:
            if self._op_context is None:
                try:
                    self._op_context = {o["name"]: bool(o.get("takes_context", True)) for o in self._pool.list_ops()}
                except SidecarError:
                    return True
            return self._op_context.get(op, True)


def _label(worker: Worker) -> int:
    return worker.slot.label if worker.slot is not None else -1


def _wire(v: Any) -> Any:
    """A loader argument as it travels (paths as strings)."""
    return os.fspath(v) if isinstance(v, os.PathLike) else v


def _each(workers: Sequence[Worker], fn: Callable[[Worker], Any]) -> list[Any]:
    """`fn(worker)` on every worker at once; each result or the exception it raised, in order."""
    if not workers:
        return []

    def run(w: Worker) -> Any:
        try:
            return fn(w)
        except Exception as exc:  # noqa: BLE001 - returned: each worker answers for itself
            return exc
    if len(workers) == 1:
        return [run(workers[0])]
    with ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="sidecar-pool-each") as ex:
        return list(ex.map(run, workers))
