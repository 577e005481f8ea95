"""`sidecar serve` and `sidecar hardware` (console script `sidecar`, `python -m sidecar`).

`main` can also be called in-process by a child forked from a template that already imported torch:
everything happens inside `main`, nothing at import time.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from sidecar.protocol import limits

log = logging.getLogger("sidecar")

READY_PREFIX = "SIDECAR_READY"
EXIT_OK = 0
EXIT_START_FAILED = 1
EXIT_USAGE = 2


def _positive_int(text: str) -> int:
    value = int(text, 0)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text, 0)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _share(text: str) -> float:
    """A fraction in (0, 1], or a percentage such as 25%."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a fraction or percentage: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (or 1%..100%), got {text}")
    return value


def _bytes(text: str, minimum: int = 1) -> int:
    """A byte count: 1073741824, 1G, 512M, 64K (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = units.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in units else t
    try:
        value = int(float(number) * mult)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be {'> 0' if minimum else '>= 0'}, got {text}")
    return value


def _bytes_or_zero(text: str) -> int:
    return _bytes(text, minimum=0)


def _seconds(text: str, *, zero_ok: bool) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds {'>=' if zero_ok else '>'} 0, "
                                         f"got {text}")
    return value


def _positive_seconds(text: str) -> float:
    return _seconds(text, zero_ok=False)


def _non_negative_seconds(text: str) -> float:
    return _seconds(text, zero_ok=True)


def _size(nbytes: int) -> str:
    """64K, 4M, 1G: a byte count as `_bytes` reads it."""
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if nbytes >= mult and nbytes % mult == 0:
            return f"{nbytes // mult}{unit}"
    return str(nbytes)


def build_parser() -> argparse.ArgumentParser:
    from sidecar import __version__

    p = argparse.ArgumentParser(prog="sidecar", description="Tensor sidecar worker.")
    p.add_argument("--version", action="version", version=f"sidecar {__version__}")
    sub = p.add_subparsers(dest="command")

    s = sub.add_parser("serve", help="run a worker (gRPC, or the Erlang port protocol with --stdio)",
                       description="Run a worker. When ready it prints one line on stdout: "
                                   "SIDECAR_READY <address> <pid>. Logs go to stderr.")
    s.add_argument("--listen", default=None,
                   help="unix:PATH, a socket path, or HOST:PORT (e.g. 127.0.0.1:0 for a free port). "
                        "Default: a fresh unix socket (mode 0600) under $XDG_RUNTIME_DIR/sidecar or "
                        "/tmp/sidecar-<uid>")
    s.add_argument("--ready-file", type=Path, default=None,
                   help="also write the ready line to this file (atomically: PATH.tmp, fsync, rename)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    s.add_argument("--ops", action="append", default=[], metavar="MODULE|FILE.py",
                   help="import MODULE (searched on sys.path, then in the current directory) or the Python "
                        "file FILE.py, and serve the ops it declares with @sidecar.op (repeatable)")
    s.add_argument("--max-concurrency", type=_positive_int, default=limits.DEFAULT_MAX_CONCURRENCY,
                   help="ops running at once (default %(default)s)")
    s.add_argument("--max-queue", type=_non_negative_int, default=limits.DEFAULT_MAX_QUEUE,
                   help="calls waiting beyond --max-concurrency before OVERLOADED (default %(default)s)")
    s.add_argument("--memory-limit", type=_bytes, default=None, metavar="BYTES",
                   help="address space the worker may add after start-up (RLIMIT_AS = size at start-up "
                        "+ BYTES): an allocation beyond it is a clean OUT_OF_MEMORY error. Accepts K/M/G")
    s.add_argument("--run-id", default=None,
                   help="run id in the names of this worker's segments (default: $SIDECAR_RUN_ID or random)")
    s.add_argument("--inline-threshold", type=_bytes_or_zero, default=limits.DEFAULT_INLINE_THRESHOLD,
                   metavar="BYTES", help="outputs smaller than this travel inside the response (default "
                                         f"{_size(limits.DEFAULT_INLINE_THRESHOLD)}). Accepts K/M/G")
    s.add_argument("--lease-ttl", type=_positive_seconds, default=limits.DEFAULT_LEASE_TTL_S, metavar="SECONDS",
                   help="seconds after which an unreleased output lease is reclaimed: its segment is "
                        "unlinked, never reused, so a host still holding the output keeps valid bytes "
                        f"(default {limits.DEFAULT_LEASE_TTL_S:g}; must be > 0)")
    s.add_argument("--max-leases", type=_positive_int, default=limits.DEFAULT_MAX_LEASES,
                   help="output leases held at most; beyond it the oldest is reclaimed the same way "
                        "(default %(default)s)")
    s.add_argument("--session-ttl", type=_positive_seconds, default=limits.DEFAULT_SESSION_TTL_S, metavar="SECONDS",
                   help="a session's state (ctx.session) is freed after this many seconds without a call, "
                        f"unless its calls say otherwise (default {limits.DEFAULT_SESSION_TTL_S:g})")
    s.add_argument("--map-cache-share", type=_share, default=0.25, metavar="FRACTION",
                   help="share of /dev/shm's size the worker may keep mapped in its input mapping cache "
                        "(default 0.25; e.g. 0.1 or 10%%)")
    s.add_argument("--threads", type=_positive_int, default=None,
                   help="torch/BLAS/OpenMP threads (default: $SIDECAR_THREADS or half the CPUs, max 8)")
    s.add_argument("--grace-period", type=_non_negative_seconds, default=limits.DEFAULT_GRACE_PERIOD_S,
                   help="seconds SIGTERM waits for in-flight calls to finish and be answered before the "
                        f"worker stops, on either transport (default {limits.DEFAULT_GRACE_PERIOD_S:g})")
    s.add_argument("--max-message-bytes", type=_bytes, default=limits.DEFAULT_MAX_MESSAGE_BYTES,
                   help=f"largest gRPC message accepted or sent (default {_size(limits.DEFAULT_MAX_MESSAGE_BYTES)}; "
                        "raise it only for PLACEMENT_INLINE of big tensors)")
    s.add_argument("--watch-stdin", action="store_true",
                   help="exit when stdin reaches EOF (for hosts that hold the worker's stdin)")
    s.add_argument("--debug-ops", action="store_true",
                   help="also serve ops that crash, hang or allocate on purpose (tests only)")
    s.add_argument("--stdio", action="store_true",
                   help="speak the Erlang port protocol on stdin/stdout instead of gRPC")
    s.add_argument("--metrics", default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0: any free port, "
                        "logged); loopback only unless $SIDECAR_METRICS_ALLOW_REMOTE=1")
    s.add_argument("--max-frame-bytes", type=_bytes, default=None, metavar="BYTES",
                   help="with --stdio: largest frame accepted, as received and as inflated from a "
                        "compressed term (default "
                        f"{_size(limits.DEFAULT_MAX_FRAME_BYTES)}, or $SIDECAR_STDIO_MAX_FRAME). Accepts K/M/G")
    s.add_argument("--log-level", default=os.environ.get("SIDECAR_LOG_LEVEL", "INFO"),
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "debug", "info", "warning", "error"])

    h = sub.add_parser("hardware", help="print what this machine offers (CPU, CUDA, MPS)")
    h.add_argument("--json", action="store_true", help="print JSON (the GetHardware message's fields)")
    h.add_argument("--device", default="auto", help="device to report as chosen (default: auto)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse exits on --help, --version and on usage errors
        return int(exc.code or 0)
    if args.command is None:  # bare `sidecar`: say what there is
        parser.print_help()
        return EXIT_OK
    if args.command == "hardware":
        return _hardware(args)
    code = _serve(args)
    if argv is None:
        # We are the whole process (console script, python -m sidecar) and everything is closed:
        # skip the interpreter's teardown, which takes ~2 s once torch is imported, so that a
        # worker whose parent died is gone within a second. In-process callers get the code back.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _setup_logging(level: str) -> None:
    logging.basicConfig(stream=sys.stderr, level=level.upper(), force=True,
                        format="%(asctime)s sidecar[%(process)d] %(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------------------------------------------
# serve


def _serve(args: argparse.Namespace) -> int:
    from sidecar.worker import lifecycle

    _setup_logging(args.log_level)
    threads = args.threads or lifecycle.default_threads()
    lifecycle.cap_thread_env(threads)  # before torch is imported (no effect if it already is)

    shutdown = lifecycle.Shutdown()
    watch = lifecycle.ParentWatch(shutdown)
    lifecycle.install_signal_handlers(shutdown, watch)
    watch.start()
    if args.watch_stdin and not args.stdio:
        lifecycle.watch_stdin(shutdown)

    from sidecar.worker.runtime import WorkerOptions, build_runtime

    lifecycle.cap_torch_threads(threads)
    opts = WorkerOptions(device=args.device, ops_modules=list(args.ops), debug_ops=args.debug_ops,
                         max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                         run_id=args.run_id, inline_threshold=args.inline_threshold,
                         lease_ttl_s=args.lease_ttl, max_leases=args.max_leases,
                         map_cache_share=args.map_cache_share, session_ttl_s=args.session_ttl)
    try:
        runtime = build_runtime(opts)  # loads --ops modules and runs their start-up hooks
    except Exception as exc:  # SidecarError and OpsModuleError included
        from sidecar.errors import SidecarError, start_error_line

        log.error("worker failed to start: %s: %s", type(exc).__name__, str(exc).replace("\n  ", "; "))
        if isinstance(exc, SidecarError):  # for the host: it raises this error, not a bare start failure
            sys.stderr.write(start_error_line(exc) + "\n")
            sys.stderr.flush()
        return EXIT_START_FAILED
    metrics = None
    try:
        if args.metrics:
            from sidecar.errors import InvalidArgument
            from sidecar.observe.worker_metrics import WorkerMetrics

            try:
                metrics = WorkerMetrics(runtime, args.metrics)
            except InvalidArgument as exc:  # a malformed or non-loopback address, a port in use
                log.error("cannot serve metrics: %s", exc)
                return EXIT_START_FAILED
            log.info("metrics on http://%s/metrics", metrics.address)
        if args.stdio:
            return _serve_stdio(runtime, args, shutdown)
        return _serve_grpc(runtime, args, shutdown)
    finally:
        if metrics is not None:
            metrics.close()
        runtime.close()


def _serve_stdio(runtime: Any, args: argparse.Namespace, shutdown: Any) -> int:
    from sidecar.worker import lifecycle
    from sidecar.worker.stdio_server import MAX_FRAME, serve_stdio

    if args.memory_limit:
        lifecycle.warm_threads()
        lifecycle.apply_memory_limit(args.memory_limit)
    return serve_stdio(runtime, shutdown, max_frame=args.max_frame_bytes or MAX_FRAME,
                       grace_period_s=args.grace_period)


def _serve_grpc(runtime: Any, args: argparse.Namespace, shutdown: Any) -> int:
    from sidecar.worker import lifecycle
    from sidecar.worker.grpc_server import SidecarServer
    from sidecar.worker.server_core import ServerCore, serve

    core = ServerCore(runtime, shutdown)  # a tainted device: answered, then exit 70 (as on the port)
    try:
        server = SidecarServer(core, args.listen, max_message_bytes=args.max_message_bytes)
        address = server.start()
    except (OSError, ValueError, PermissionError) as exc:
        log.error("cannot listen: %s", exc)
        return EXIT_START_FAILED
    if args.memory_limit:
        lifecycle.warm_threads(server.executor, server.threads)
        lifecycle.apply_memory_limit(args.memory_limit)

    line = f"{READY_PREFIX} {address} {os.getpid()}"
    if args.ready_file is not None:
        _write_atomically(args.ready_file, line + "\n")
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    log.info("serving on %s (device %s, pid %d)", address, runtime.device, os.getpid())
    try:
        return serve(core, server, args.grace_period)
    finally:
        if args.ready_file is not None:
            try:
                args.ready_file.unlink()
            except FileNotFoundError:
                pass


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------------
# hardware


def _hardware(args: argparse.Namespace) -> int:
    logging.basicConfig(stream=sys.stderr, level="WARNING")
    from sidecar.worker import hardware

    device = args.device
    try:
        from sidecar.worker.devices import select_device

        device = str(select_device(args.device))  # "auto" -> what a worker would pick
    except Exception as exc:
        logging.getLogger("sidecar").warning("device %s: %s", args.device, exc)
    info = hardware.detect(device)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=False))
        return EXIT_OK
    print(hardware.format_text(info))
    return EXIT_OK
