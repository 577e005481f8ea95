"""Ops by name: the `@sidecar.op` decorator, start-up hooks and `--ops` module loading.

Decorators only *declare*: they record an `OpSpec` under the defining module's name. A `Registry`
(one per worker runtime) picks up the declarations of the modules it loads, so the same module can
serve several registries (tests build many runtimes in one process) and importing a module twice
does not register anything twice.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, ParamSpec, Sequence, TypeVar, overload

from sidecar.errors import UnknownOp, close_names, shorten

F = TypeVar("F", bound=Callable[..., Any])
# A decorated op keeps its own signature for the type checker (calling it directly, in tests).
P = ParamSpec("P")
R = TypeVar("R")

CTX_PARAM = "ctx"  # an op that declares a parameter of this name receives an OpContext


@dataclass(frozen=True)
class OpSpec:
    name: str
    fn: Callable[..., Any]
    doc: str
    min_inputs: int
    max_inputs: int  # -1 = variadic
    idempotent: bool
    attrs: tuple[str, ...]
    module: str
    accepts_ctx: bool = False
    any_attrs: bool = False  # the function takes **kwargs: every attr is passed through
    required_attrs: tuple[str, ...] = ()  # keyword-only parameters without a default
    # Pure torch on its inputs (no data read, no side effect): it runs on meta tensors, so the size of
    # its outputs is known before it runs (`estimate_output_nbytes`).
    meta_ok: bool = False


@dataclass
class OpContext:
    """What an op that declares `ctx` gets: where it runs, who asked, and `empty` for its outputs."""

    device: Any  # torch.device
    runtime: Any = None  # sidecar.worker.runtime.Runtime
    request_id: str = ""
    is_cancelled: Callable[[], bool] = field(default=lambda: False)
    # Set by the dispatcher on CPU workers: (shape, torch dtype) -> a tensor in a block of the call.
    allocator: Callable[[tuple[int, ...], Any], Any] | None = None
    session_id: str = ""       # the call's session ("" = none): ExecuteRequest.session_id
    session_ttl_s: float = 0.0

    def resource(self, name: str) -> Any:
        """The object the worker holds as `name` (built by a loader the host asked for with Load:
        `pool.load(name, loader, ...)`); RESOURCE_FAILED when it is not loaded on this worker."""
        if self.runtime is None:
            from sidecar.errors import ResourceFailed

            raise ResourceFailed(f"resource {name!r}: this op runs without a worker runtime", resource=name,
                                 cause="not_loaded")
        return self.runtime.resources.get(name)

    @property
    def session(self) -> dict[str, Any]:
        """The state this call's session shares with its other calls on this worker (a dict, empty at
        the session's first call), freed when the session closes or idles out. A call outside a
        session gets INVALID_ARGUMENT (open one: `with pool.session() as s: s.call(...)`)."""
        if not self.session_id or self.runtime is None:
            from sidecar.errors import InvalidArgument

            raise InvalidArgument("this op keeps session state (ctx.session) but the call belongs to no session",
                                  field="session_id", expected="a session id",
                                  suggestion="call it through a session: with pool.session() as s: s.call(...)")
        state: dict[str, Any] = self.runtime.sessions.touch(self.session_id, self.session_ttl_s,
                                                                  count=False).state
        return state

    def empty(self, shape: int | Sequence[int], dtype: Any) -> Any:
        """An uninitialised tensor on the op's device to write a (large) output into.

        `dtype` is a torch dtype or a name ("float32"). On a CPU worker a tensor of at least the
        inline threshold lies in a warm block of the worker's shared-memory arena: returned as an
        output, it is leased to the host as it is (no page faults, no copy). Use it with `out=`:
        `torch.mul(a, b, out=ctx.empty(shape, a.dtype))`. The block is the call's: returned (or a
        view of it returned), it stays alive under the call's lease; otherwise it is reused once
        the call ends, so never keep such a tensor across calls. Elsewhere it is `torch.empty`.
        """
        import torch

        from sidecar.dataplane import dtypes
        from sidecar.errors import SidecarError

        shp = (int(shape),) if isinstance(shape, int) else tuple(int(d) for d in shape)
        if not isinstance(dtype, torch.dtype):
            try:
                dtype = dtypes.to_torch_dtype(dtypes.name_of(dtype))
            except SidecarError:
                raise TypeError(f"ctx.empty: unsupported dtype {dtype!r}") from None
        if self.allocator is not None:
            return self.allocator(shp, dtype)
        return torch.empty(shp, dtype=dtype, device=self.device)


class OpsModuleError(Exception):
    """An --ops module could not be loaded, or it declares an op whose name is taken."""


# Declarations by defining module (fn.__module__), in declaration order.
_DECLARED_OPS: dict[str, list[OpSpec]] = {}
_DECLARED_HOOKS: dict[str, list[Callable[..., Any]]] = {}
_DECL_LOCK = threading.Lock()


def _infer_signature(fn: Callable[..., Any]) -> tuple[int, int, list[str], bool, bool, list[str]]:
    """(min_inputs, max_inputs, attr names, accepts ctx, takes **kwargs, required attrs) from fn's signature.

    Positional parameters are inputs (those with defaults are optional inputs); keyword-only
    parameters and positional ones with defaults can be given as attrs.
    """
    sig = inspect.signature(fn)
    lo = hi = 0
    attrs: list[str] = []
    required: list[str] = []
    ctx = var_kw = False
    for p in sig.parameters.values():
        if p.name == CTX_PARAM:
            ctx = True
            continue
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            if hi != -1:
                hi += 1
            if p.default is p.empty:
                lo += 1
            elif p.kind is p.POSITIONAL_OR_KEYWORD:
                attrs.append(p.name)
        elif p.kind is p.VAR_POSITIONAL:
            hi = -1
        elif p.kind is p.KEYWORD_ONLY:
            attrs.append(p.name)
            if p.default is p.empty:
                required.append(p.name)
        elif p.kind is p.VAR_KEYWORD:
            var_kw = True
    return lo, hi, attrs, ctx, var_kw, required


def make_spec(fn: Callable[..., Any], name: str, *, idempotent: bool = True, doc: str | None = None,
              min_inputs: int | None = None, max_inputs: int | None = None,
              attrs: Sequence[str] | None = None, meta_ok: bool = False) -> OpSpec:
    if not name or not isinstance(name, str):
        raise ValueError("an op needs a non-empty string name")
    lo, hi, inferred_attrs, ctx, var_kw, required = _infer_signature(fn)
    text = doc if doc is not None else inspect.getdoc(fn) or ""
    return OpSpec(
        name=name, fn=fn, doc=text.strip(),
        min_inputs=lo if min_inputs is None else min_inputs,
        max_inputs=hi if max_inputs is None else max_inputs,
        idempotent=idempotent,
        attrs=tuple(inferred_attrs if attrs is None else attrs),
        module=getattr(fn, "__module__", "") or "",
        accepts_ctx=ctx, any_attrs=var_kw, required_attrs=tuple(required), meta_ok=meta_ok,
    )


@overload
def op(fn: Callable[P, R], /) -> Callable[P, R]: ...


@overload
def op(name: str | None = None, *, idempotent: bool = True, doc: str | None = None, min_inputs: int | None = None,
       max_inputs: int | None = None, attrs: Sequence[str] | None = None,
       meta_ok: bool = False) -> Callable[[Callable[P, R]], Callable[P, R]]: ...


def op(name: str | Callable[..., Any] | None = None, *, idempotent: bool = True, doc: str | None = None,
       min_inputs: int | None = None, max_inputs: int | None = None, attrs: Sequence[str] | None = None,
       meta_ok: bool = False) -> Any:
    """Declare `fn` as the op `name`: `@sidecar.op("name", ...)`, or bare `@sidecar.op` (also
    `@sidecar.op()`) for an op named as the function. The function is returned as it is.

    Inputs arrive as positional arguments (torch tensors on the worker's device, pyarrow Tables or
    plain values), attrs as keyword arguments; a parameter named `ctx` receives an `OpContext`:
    write a large output into `ctx.empty(shape, dtype)` to skip a copy on the way out.
    Arity and attr names are inferred from the signature unless given. The function returns a
    tensor, a tuple/list of them, an Arrow table, or a plain value. `meta_ok=True` says it is pure
    torch (it also runs on "meta" tensors, which hold no data, with ctx=None): the worker then knows
    its output sizes before running it (an inline output too big for a message is refused at once).
    """
    if callable(name):  # bare @op: `name` is the function itself
        return op(idempotent=idempotent, doc=doc, min_inputs=min_inputs, max_inputs=max_inputs, attrs=attrs,
                  meta_ok=meta_ok)(name)

    def deco(fn: Callable[P, R]) -> Callable[P, R]:
        op_name = getattr(fn, "__name__", "") if name is None else name
        spec = make_spec(fn, op_name, idempotent=idempotent, doc=doc, min_inputs=min_inputs,
                         max_inputs=max_inputs, attrs=attrs, meta_ok=meta_ok)
        with _DECL_LOCK:
            decl = _DECLARED_OPS.setdefault(spec.module, [])
            # Re-executing a module (importlib.reload) replaces its earlier declaration.
            decl[:] = [s for s in decl if s.name != spec.name] + [spec]
        fn.__sidecar_op__ = spec  # type: ignore[attr-defined]
        return fn
    return deco


def on_startup(fn: F) -> F:
    """Declare a hook run once per worker, before it reports ready (load a model, warm a cache).

    It is called as `fn()` or, if it takes one parameter, `fn(runtime)` (runtime.device says where
    to put things). An exception stops the worker from starting.
    """
    with _DECL_LOCK:
        hooks = _DECLARED_HOOKS.setdefault(fn.__module__, [])
        hooks[:] = [h for h in hooks if h.__qualname__ != fn.__qualname__] + [fn]
    return fn


def _in_module(defining: str, loaded: str) -> bool:
    return defining == loaded or defining.startswith(loaded + ".")


class Registry:
    """The ops one worker serves. Filled at start-up, read-only afterwards (safe from any thread)."""

    def __init__(self) -> None:
        self._ops: dict[str, OpSpec] = {}
        self._modules: list[str] = []
        self._hooks_run: set[Callable[..., Any]] = set()

    def add(self, obj: OpSpec | Callable[..., Any], *, replace: bool = False) -> OpSpec:
        """Register an OpSpec or a function decorated with `@op`."""
        spec = obj if isinstance(obj, OpSpec) else getattr(obj, "__sidecar_op__", None)
        if not isinstance(spec, OpSpec):
            raise TypeError(f"{obj!r} is neither an OpSpec nor a function decorated with @sidecar.op")
        old = self._ops.get(spec.name)
        if old is not None and old.fn is not spec.fn and not replace:
            raise OpsModuleError(f"op {spec.name!r} from {spec.module} is already defined by {old.module}")
        self._ops[spec.name] = spec
        return spec

    def load_module(self, dotted: str) -> list[OpSpec]:
        """Import `dotted` (a module name, or a path to a .py file) and register the ops it (or its
        submodules) declared. Idempotent. The current directory is searched too, last."""
        if _is_file_path(dotted):
            dotted = _import_file(dotted)
        else:
            _search_cwd()
            try:
                importlib.import_module(dotted)
            except ModuleNotFoundError as exc:
                if exc.name is None or not (dotted == exc.name or dotted.startswith(exc.name + ".")):
                    raise OpsModuleError(f"ops module {dotted!r} failed on import: a module it imports is "
                                         f"missing: {exc}") from exc
                searched = ", ".join(p or os.getcwd() for p in sys.path)
                raise OpsModuleError(f"cannot import ops module {dotted!r}: {exc}; searched: {searched}. Give "
                                     "a module importable from one of those, or a path to a .py file "
                                     "(--ops ./my_ops.py)") from exc
            except ImportError as exc:
                raise OpsModuleError(f"cannot import ops module {dotted!r}: {exc}") from exc
            except Exception as exc:  # the module itself failed while running
                raise OpsModuleError(f"ops module {dotted!r} failed on import: "
                                     f"{type(exc).__name__}: {exc}") from exc
        with _DECL_LOCK:
            specs = [s for mod, decl in _DECLARED_OPS.items() if _in_module(mod, dotted) for s in decl]
        for spec in specs:
            self.add(spec)
        if dotted not in self._modules:
            self._modules.append(dotted)
        return specs

    @property
    def modules(self) -> list[str]:
        return list(self._modules)

    def get(self, name: str) -> OpSpec:
        try:
            return self._ops[name]
        except KeyError:
            raise UnknownOp(f"unknown op {shorten(name)}", op=name,
                            close_names=close_names(str(name), self._ops)) from None

    def specs(self) -> list[OpSpec]:
        return sorted(self._ops.values(), key=lambda s: s.name)

    def names(self) -> list[str]:
        return sorted(self._ops)

    def __contains__(self, name: object) -> bool:
        return name in self._ops

    def __len__(self) -> int:
        return len(self._ops)

    def startup_hooks(self) -> list[Callable[..., Any]]:
        with _DECL_LOCK:
            return [h for loaded in self._modules for mod, hooks in _DECLARED_HOOKS.items()
                    if _in_module(mod, loaded) for h in hooks]

    def run_startup_hooks(self, runtime: Any) -> int:
        """Run every hook of the loaded modules that has not run in this registry yet; returns how many ran."""
        ran = 0
        for hook in _unique(self.startup_hooks()):
            if hook in self._hooks_run:
                continue
            self._hooks_run.add(hook)  # before the call: a failing hook is not retried
            takes_arg = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                            for p in inspect.signature(hook).parameters.values())
            try:
                hook(runtime) if takes_arg else hook()
            except Exception as exc:
                raise OpsModuleError(f"start-up hook {hook.__module__}.{hook.__qualname__} failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
            ran += 1
        return ran


def estimate_output_nbytes(spec: OpSpec, inputs: Sequence[Any], attrs: dict[str, Any]) -> int | None:
    """Bytes of the tensors `spec` would return for these inputs (TensorRefs and plain values), found
    by running it on meta tensors: no memory, no compute. None when not known (the op is not
    `meta_ok`, an input is not a tensor it can stand in for, or the op refuses the inputs)."""
    if not spec.meta_ok:
        return None
    import torch

    from sidecar.dataplane import dtypes
    from sidecar.protocol.refs import ArrowRef, TensorRef

    def stand_in(v: Any) -> Any:
        if isinstance(v, TensorRef):
            return torch.empty(tuple(v.shape), dtype=dtypes.to_torch_dtype(v.dtype), device="meta")
        if isinstance(v, ArrowRef):
            raise LookupError("an Arrow table has no meta form")
        if isinstance(v, (list, tuple)):
            return [stand_in(x) for x in v]
        if isinstance(v, dict):
            return {k: stand_in(x) for k, x in v.items()}
        return v

    def nbytes(out: Any) -> int:
        if isinstance(out, torch.Tensor):
            return out.numel() * out.element_size()
        if isinstance(out, (list, tuple)):
            return sum(nbytes(x) for x in out)
        if isinstance(out, dict):
            return sum(nbytes(x) for x in out.values())
        return 0

    try:
        kwargs = dict(attrs, **({CTX_PARAM: None} if spec.accepts_ctx else {}))
        return nbytes(spec.fn(*[stand_in(v) for v in inputs], **kwargs))
    except Exception:  # refused or unknown: the call itself will say why
        return None


def _is_file_path(spec: str) -> bool:
    return spec.endswith(".py") or os.sep in spec or (os.altsep is not None and os.altsep in spec)


def _search_cwd() -> None:
    """`python -m sidecar` searches the current directory but the `sidecar` console script does not:
    make both find an ops module next to where the worker was started (after everything installed)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def _import_file(path: str) -> str:
    """Imports the .py file at `path` as a module named after it; returns that name."""
    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise OpsModuleError(f"ops file {path!r} does not exist (looked for {full})")
    name = os.path.splitext(os.path.basename(full))[0]
    loaded = sys.modules.get(name)
    if loaded is not None:
        if os.path.abspath(getattr(loaded, "__file__", "") or "") == full:
            return name  # already imported from this file
        raise OpsModuleError(f"ops file {path!r} would be the module {name!r}, but a module of that name is "
                             f"already loaded from {getattr(loaded, '__file__', None) or 'elsewhere'}: rename the file")
    spec = importlib.util.spec_from_file_location(name, full)
    if spec is None or spec.loader is None:
        raise OpsModuleError(f"ops file {path!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before it runs: dataclasses, pickling and its own imports look it up there
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise OpsModuleError(f"ops file {path!r} failed on import: {type(exc).__name__}: {exc}") from exc
    return name


def _unique(items: Iterable[Any]) -> list[Any]:
    seen: list[Any] = []
    for item in items:
        if item not in seen:
            seen.append(item)
    return seen
