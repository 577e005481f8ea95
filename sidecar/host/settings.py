"""`PoolSettings`: a pool's parameters, checked once, and what follows from them for its workers (the
`sidecar serve` command line, the environment, the GPUs they are spread over).

`Pool.__init__` builds one from its keyword arguments (see `Pool` for what each means); launching,
supervision and call scheduling read it and never change it.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from sidecar.dataplane.names import new_run_id, validate_run_id
from sidecar.errors import InvalidArgument
from sidecar.protocol.limits import CANCEL_GRACE_ENV, DEFAULT_INLINE_THRESHOLD, HOST_PID_ENV

__all__ = ["PoolSettings", "find_gpus", "backoff_pair"]


def backoff_pair(value: tuple[float, float] | float, name: str) -> tuple[float, float]:
    """(initial, cap) of a backoff; a single number means (n, 50 n)."""
    first, cap = (value, value * 50) if isinstance(value, (int, float)) else value
    if first < 0 or cap < first:
        raise ValueError(f"{name} wants (initial >= 0, cap >= initial), got {value!r}")
    return float(first), float(cap)


def find_gpus(device: str, gpus: int | Sequence[str | int] | None, env: Mapping[str, str]) -> list[str]:
    """The GPUs to spread workers over: `gpus` as given (a count or CUDA_VISIBLE_DEVICES entries),
    else, for device "auto"/"cuda", the environment's CUDA_VISIBLE_DEVICES or NVML's count (which
    does not initialise CUDA in this process)."""
    if isinstance(gpus, int):
        return [str(i) for i in range(gpus)]
    if gpus is not None:
        return [str(g) for g in gpus]
    if device not in ("auto", "cuda"):
        return []
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no library: no GPUs to place
        return []


@dataclass(frozen=True)
class PoolSettings:
    workers: int
    device: str
    ops: tuple[str, ...]
    debug_ops: bool
    run_id: str
    python: str
    start_timeout: float
    max_attempts: int
    retry_backoff: tuple[float, float]
    restart_backoff: tuple[float, float]
    stable_after_s: float
    breaker_threshold: int
    breaker_window_s: float
    breaker_cooldown_s: float
    use_template: bool
    spares: int
    worker_args: tuple[str, ...]
    env: Mapping[str, str]          # the workers' environment (GPU placement added per worker)
    gpus: tuple[str, ...]
    health_interval_s: float
    health_timeout_s: float
    health_failures: int
    crash_detect_s: float
    acquire_timeout_s: float
    grace_s: float
    inline_threshold: int
    tail_lines: int
    lease_flags: tuple[str, ...] = field(default=())  # --lease-ttl / --max-leases when set

    @classmethod
    def build(cls, workers: int = 2, *, device: str = "auto", ops: Sequence[str] = (), debug_ops: bool = False,
              run_id: str | None = None, start_timeout: float = 60.0, max_attempts: int = 3,
              retry_backoff: tuple[float, float] = (0.01, 1.0), restart_backoff: tuple[float, float] = (0.1, 5.0),
              stable_after_s: float = 5.0, breaker_threshold: int = 5, breaker_window_s: float = 30.0,
              breaker_cooldown_s: float = 5.0, use_template: bool = True, spares: int | None = None,
              worker_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
              gpus: int | Sequence[str | int] | None = None, threads: int | None = None,
              health_interval_s: float = 5.0, health_timeout_s: float = 2.0, health_failures: int = 3,
              crash_detect_s: float = 1.0, acquire_timeout_s: float | None = None, grace_s: float = 5.0,
              inline_threshold: int = DEFAULT_INLINE_THRESHOLD, python: str = sys.executable, tail_lines: int = 40,
              lease_ttl_s: float | None = None, max_leases: int | None = None,
              cancel_grace_s: float = 10.0) -> PoolSettings:
        """`Pool`'s keyword arguments, checked (InvalidArgument / ValueError name the bad one)."""
        if workers < 1:
            raise InvalidArgument(f"a pool needs at least one worker, got {workers}", field="workers")
        if max_attempts < 1:
            raise InvalidArgument(f"max_attempts must be >= 1, got {max_attempts}", field="max_attempts")
        if spares is not None and spares < 0:
            raise InvalidArgument(f"spares must be >= 0, got {spares}", field="spares")
        if lease_ttl_s is not None and not lease_ttl_s > 0:
            raise InvalidArgument(f"lease_ttl_s must be > 0 seconds, got {lease_ttl_s!r}", field="lease_ttl_s")
        if max_leases is not None and max_leases < 1:
            raise InvalidArgument(f"max_leases must be >= 1, got {max_leases!r}", field="max_leases")
        lease_flags = ([] if lease_ttl_s is None else ["--lease-ttl", repr(float(lease_ttl_s))]) + (
            [] if max_leases is None else ["--max-leases", str(int(max_leases))])

        base_env = dict(os.environ if env is None else env)
        if threads is not None:
            base_env["SIDECAR_THREADS"] = str(int(threads))
        elif "SIDECAR_THREADS" not in base_env:
            # N workers on one machine: split the CPUs instead of each taking half of them.
            base_env["SIDECAR_THREADS"] = str(max(1, (len(os.sched_getaffinity(0)) or 1) // workers))
        # A native crash then leaves a Python traceback in the worker's stderr tail.
        base_env.setdefault("PYTHONFAULTHANDLER", "1")
        # Workers watch this pid, not their parent (the template may die and be replaced), and a
        # cancelled call that runs on longer than cancel_grace_s makes its worker NOT_SERVING.
        base_env[HOST_PID_ENV] = str(os.getpid())
        base_env[CANCEL_GRACE_ENV] = f"{float(cancel_grace_s):g}"
        found = find_gpus(device, gpus, base_env)
        # A forked worker replaces a CPU worker in tens of ms, but a GPU worker first has to create its
        # CUDA context (~0.4 s on an H200): there only a warm spare meets the < 100 ms target.
        uses_gpu = device.startswith("cuda") or (device == "auto" and bool(found))
        return cls(
            workers=int(workers), device=device, ops=tuple(ops), debug_ops=debug_ops,
            run_id=validate_run_id(run_id) if run_id else new_run_id(), python=python,
            start_timeout=float(start_timeout), max_attempts=int(max_attempts),
            retry_backoff=backoff_pair(retry_backoff, "retry_backoff"),
            restart_backoff=backoff_pair(restart_backoff, "restart_backoff"), stable_after_s=float(stable_after_s),
            breaker_threshold=breaker_threshold, breaker_window_s=breaker_window_s,
            breaker_cooldown_s=breaker_cooldown_s, use_template=use_template,
            spares=int(spares) if spares is not None else (1 if uses_gpu else 0), worker_args=tuple(worker_args),
            env=base_env, gpus=tuple(found), health_interval_s=float(health_interval_s),
            health_timeout_s=float(health_timeout_s), health_failures=int(health_failures),
            crash_detect_s=float(crash_detect_s),
            acquire_timeout_s=float(acquire_timeout_s if acquire_timeout_s is not None else start_timeout),
            grace_s=float(grace_s), inline_threshold=int(inline_threshold), tail_lines=int(tail_lines),
            lease_flags=tuple(lease_flags))

    def gpu_of_worker(self, index: int) -> str | None:
        """Worker slot i sees GPU i mod n, when there are several to spread over."""
        return self.gpus[index % len(self.gpus)] if len(self.gpus) > 1 else None

    def gpu_of_spare(self, index: int) -> str | None:
        return self.gpus[(index + 1) % len(self.gpus)] if len(self.gpus) > 1 else None

    def serve_args(self, socket_path: str) -> list[str]:
        """The `sidecar serve` arguments of one worker listening on `socket_path`."""
        args = ["--run-id", self.run_id, "--device", self.device, "--watch-stdin", "--listen", f"unix:{socket_path}",
                "--inline-threshold", str(self.inline_threshold), "--grace-period", f"{self.grace_s:g}"]
        for module in self.ops:
            args += ["--ops", module]
        if self.debug_ops:
            args.append("--debug-ops")
        return args + list(self.lease_flags) + list(self.worker_args)

    def worker_env(self, gpu: str | None) -> dict[str, str]:
        env = dict(self.env)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        return env
