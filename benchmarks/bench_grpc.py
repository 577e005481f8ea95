"""Round trips through a real sidecar: zero-copy descriptors vs bytes inside the gRPC message.

One worker (`python -m sidecar serve`, unix socket) serves every case, side by side in one run:

  echo/bare-grpc      a bare grpcio server in another process that answers each request with its
                      own bytes (generic handler, no protobuf, no sidecar): what gRPC itself costs
                      for a message the size of a small call; the floor of every case here
  echo/ListOps        a plain small-message RPC through the sidecar's servicer
  echo/health         a grpc.health Check through the same Client and worker: the channel, the
                      worker's server and its threads, but a trivial servicer; tiny-identity minus
                      this is what the Execute path itself costs (codecs, core, dispatcher)
  echo/execute-raw    the tiny identity's ExecuteRequest encoded once, sent as bytes on a bare
                      channel to the worker's Execute: the worker's whole share of the small call
                      (tiny-identity minus this is the host's: Client, codecs, data plane)
  echo/tiny-identity  identity of a 16-byte tensor sent inline through `Client.call` (a Client
                      with the defaults: no deadline, as the bare echo has none): the small call;
                      the table gives it as a multiple of the bare echo (target 1.2x)
  zero-copy/alias     identity of a tensor already in the host arena: the worker views the host's
                      segment and answers with a descriptor of the same memory (no byte copied)
  zero-copy/out       same input, output written by the worker into a caller `out` ref in the
                      host arena (one memcpy inside the worker)
  zero-copy/lease     same input, output copied into the worker's arena and returned under a
                      lease (one memcpy inside the worker, lease released on the next call)
  bytes-in-message    the tensor sent inline in the request and returned inline in the response
                      (PLACEMENT_INLINE, message limits raised)
  telemetry           small calls with one WatchTelemetry stream attached (a watcher in another
                      process) vs none, interleaved; round trip and the worker's own total_ns

Usage: .venv/bin/python benchmarks/bench_grpc.py [--sizes-mb 1 100] [--quick] [--json]
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from timing import sample_us  # benchmarks/timing.py

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sidecar.host import Client  # noqa: E402


def start_worker(*args: str) -> tuple[subprocess.Popen[str], str]:
    python = ROOT / ".venv" / "bin" / "python"
    proc = subprocess.Popen([str(python if python.exists() else sys.executable), "-m", "sidecar", "serve", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                            text=True, cwd=ROOT)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if not line or line[0] != "SIDECAR_READY":
        proc.kill()
        raise SystemExit(f"worker did not start: {line}")
    return proc, line[1]


def measure(fn: Callable[[], Any], reps: int, warmup: int = 3) -> list[float]:
    """Seconds per call, `reps` samples (GC off while timing; collected between samples)."""
    return [us / 1e6 for us in sample_us(fn, reps, warmup, quiet_gc=True)]


def interleaved(cases: dict[str, Callable[[], Any]], reps: int, blocks: int = 10) -> dict[str, list[float]]:
    """`reps` samples of each case, taken in `blocks` alternating blocks (so that the drift of a
    shared machine hits every case alike)."""
    out: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(blocks):
        for name, fn in cases.items():
            out[name] += measure(fn, max(1, reps // blocks))
    return out


BARE_ECHO = """
import sys
from concurrent import futures
import grpc
def echo(request, context):
    return request
handler = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=int(sys.argv[2])))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(sys.argv[1])
server.start()
print("READY", flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
"""


def start_bare_echo(threads: int) -> tuple[subprocess.Popen[str], Callable[[bytes], bytes]]:
    """A bare grpcio echo server in its own process, and a unary callable to it (bytes in, bytes out)."""
    import grpc

    path = f"/tmp/sidecar-bench-echo-{os.getpid()}.sock"
    proc = subprocess.Popen([sys.executable, "-c", BARE_ECHO, f"unix:{path}", str(threads)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "READY":
        proc.kill()
        raise SystemExit("the bare echo server did not start")
    channel = grpc.insecure_channel(f"unix:{path}")
    return proc, channel.unary_unary("/bench.Echo/Echo")


def raw_execute_of(address: str, client: Client, tiny: np.ndarray) -> Callable[[], bytes]:
    """A callable that sends the identity of `tiny` to the worker as pre-encoded request bytes on a
    bare channel (the same request `client` would send: its ids, inline input)."""
    import grpc

    from sidecar.host.grpc_transport import channel_target
    from sidecar.protocol import grpc_codec

    prepared = client.prepare("identity", (tiny,))
    request = grpc_codec.call_to_request(prepared.call).SerializeToString()
    prepared.done()
    execute = grpc.insecure_channel(channel_target(address)).unary_unary("/sidecar.v1.Sidecar/Execute")
    return lambda: execute(request)  # type: ignore[no-any-return]


def summary(name: str, size: int, samples: list[float]) -> dict[str, Any]:
    s = sorted(samples)
    return {"case": name, "bytes": size, "n": len(s), "median_s": statistics.median(s),
            "p90_s": s[min(len(s) - 1, int(len(s) * 0.9))], "min_s": s[0]}


def fmt_t(sec: float) -> str:
    return f"{sec * 1e6:9.1f} us" if sec < 1e-3 else f"{sec * 1e3:9.2f} ms"


def run(sizes_mb: list[float], quick: bool, device: str, telemetry_only: bool = False) -> dict[str, Any]:
    proc, address = start_worker("--device", device, "--max-message-bytes", "1G", "--threads", "1",
                                 "--max-concurrency", "2")
    results: list[dict[str, Any]] = []
    try:
        c = Client(address, timeout=120)
        fat = Client(address, timeout=120, inline_threshold=1 << 62, max_message_bytes=1 << 30)
        reps_small = 400 if quick else 2000
        tiny = np.arange(4, dtype=np.float32)
        # The bare echo carries a message of the size of the identity's request and response
        # (~90 bytes each way).
        plain = Client(address)  # the defaults: no deadline
        echo_proc, echo = start_bare_echo(threads=8)
        try:
            request = bytes(range(90))
            assert echo(request) == request
            raw_execute = raw_execute_of(address, plain, tiny)
            small = interleaved({"echo/bare-grpc": lambda: echo(request),
                                 "echo/execute-raw": raw_execute,
                                 "echo/tiny-identity": lambda: plain.call("identity", tiny),
                                 "echo/health": plain.health,
                                 "echo/ListOps": c.list_ops}, reps_small)
        finally:
            assert echo_proc.stdin is not None
            echo_proc.stdin.close()
            echo_proc.wait(30)
            plain.close()
        results.append(summary("echo/bare-grpc", len(request), small["echo/bare-grpc"]))
        results.append(summary("echo/execute-raw", tiny.nbytes, small["echo/execute-raw"]))
        results.append(summary("echo/health", 0, small["echo/health"]))
        results.append(summary("echo/ListOps", 0, small["echo/ListOps"]))
        results.append(summary("echo/tiny-identity", tiny.nbytes, small["echo/tiny-identity"]))
        for mb in ([] if telemetry_only else sizes_mb):
            results += zero_copy_cases(c, fat, mb, quick)
            gc.collect()
        results += telemetry_overhead(c, address, tiny, quick)
        c.close()
        fat.close()
    finally:
        proc.terminate()
        proc.wait(30)
    import platform

    return {"device": device, "python": sys.version.split()[0], "cpus": os.cpu_count(),
            "cpu_model": _cpu_model(), "platform": platform.platform(), "results": results}


def zero_copy_cases(c: Client, fat: Client, mb: float, quick: bool) -> list[dict[str, Any]]:
    """The large-tensor cases at one size (a function of their own: its tensors go when it returns)."""
    rows: list[dict[str, Any]] = []
    n = int(mb * (1 << 20)) // 4
    size = n * 4
    x = c.empty(n, "float32")
    x[:] = np.arange(n, dtype=np.float32)
    out = c.empty(n, "float32")
    plain = np.arange(n, dtype=np.float32)
    reps = max(10, min(200, int(2000 / max(mb, 1)))) if not quick else max(5, min(50, int(200 / max(mb, 1))))
    reps_fat = max(3, min(50, int(500 / max(mb, 1)))) if not quick else 3
    # Correctness first: every path must return the same bytes.
    assert np.array_equal(c.call("identity", x), x)
    assert np.array_equal(c.call("identity", x, placement="shm"), x)
    assert c.call("identity", x, out=out) is out and np.array_equal(out, x)
    assert np.array_equal(fat.call("identity", plain, placement="inline"), plain)
    rows.append(summary("zero-copy/alias", size, measure(lambda: c.call("identity", x), reps)))
    rows.append(summary("zero-copy/out", size, measure(lambda: c.call("identity", x, out=out), reps)))
    rows.append(summary("zero-copy/lease", size,
                        measure(lambda: c.call("identity", x, placement="shm"), reps)))
    rows.append(summary("bytes-in-message", size,
                        measure(lambda: fat.call("identity", plain, placement="inline"), reps_fat, 1)))
    return rows


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


WATCHER = """
import sys, threading
from sidecar.host import Client
c = Client(sys.argv[1])
watch, count, reader = None, [0], None
def drain(w):
    for _ in w:
        count[0] += 1
for line in sys.stdin:
    if line.strip() == "on":
        watch = c.watch_telemetry(memory_interval_s=1.0)
        reader = threading.Thread(target=drain, args=(watch,), daemon=True)
        reader.start()
    elif watch is not None:
        watch.close()
        reader.join(5)
        watch = None
    print("ack", count[0], flush=True)
"""


def telemetry_overhead(c: Client, address: str, tiny: np.ndarray, quick: bool) -> list[dict[str, Any]]:
    """Interleaved blocks of small calls without and with a watcher (another process, as in real
    use), so that drift hits both alike. Round trip and the worker's own total_ns are both kept."""
    rounds, per = (6, 100) if quick else (20, 200)
    watcher = subprocess.Popen([sys.executable, "-c", WATCHER, address], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert watcher.stdin is not None and watcher.stdout is not None
    rt: dict[bool, list[float]] = {False: [], True: []}
    worker: dict[bool, list[float]] = {False: [], True: []}
    events = 0

    def block(on: bool) -> None:
        for _ in range(5):
            c.call("identity", tiny)
        gc.disable()
        try:
            for _ in range(per):
                t0 = time.perf_counter_ns()
                res = c.execute("identity", tiny)
                rt[on].append((time.perf_counter_ns() - t0) / 1e9)
                worker[on].append(res.timing.total_ns / 1e9)
        finally:
            gc.enable()

    def toggle(cmd: str) -> int:
        watcher.stdin.write(cmd + "\n")
        watcher.stdin.flush()
        reply = watcher.stdout.readline().split()
        time.sleep(0.05)  # let the stream attach (or detach) before timing
        return int(reply[1])

    try:
        for _ in range(rounds):
            block(False)
            toggle("on")
            block(True)
            events = toggle("off")
    finally:
        watcher.stdin.close()
        watcher.wait(10)
    out = [summary("telemetry/no-watcher", tiny.nbytes, rt[False]),
           summary("telemetry/one-watcher", tiny.nbytes, rt[True]),
           summary("telemetry/worker-no-watcher", tiny.nbytes, worker[False]),
           summary("telemetry/worker-one-watcher", tiny.nbytes, worker[True])]
    out[1]["events_seen"] = events
    return out


def table(report: dict[str, Any]) -> str:
    rows = report["results"]
    by = {(r["case"], r["bytes"]): r for r in rows}
    echo = by[("echo/tiny-identity", 16)]["median_s"]
    bare = next(r for r in rows if r["case"] == "echo/bare-grpc")["median_s"]
    lines = [f"worker device {report['device']}, {report['cpus']} CPUs ({report['cpu_model']}), "
             f"python {report['python']}", "",
             f"{'case':<30}{'size':>10}{'median':>13}{'p90':>13}{'min':>13}{'x echo':>9}{'vs bytes':>11}",
             "-" * 99]
    for r in rows:
        size = f"{r['bytes'] / (1 << 20):.0f} MB" if r["bytes"] >= 1 << 20 else f"{r['bytes']} B"
        fat = by.get(("bytes-in-message", r["bytes"]))
        speed = f"{fat['median_s'] / r['median_s']:9.0f}x" if fat and r["case"].startswith("zero-copy") else ""
        lines.append(f"{r['case']:<30}{size:>10}{fmt_t(r['median_s']):>13}{fmt_t(r['p90_s']):>13}"
                     f"{fmt_t(r['min_s']):>13}{r['median_s'] / echo:8.2f}x{speed:>11}")
    lines.append("")
    lines.append(f"small call: Client identity of 16 bytes is {echo / bare:.2f}x a bare grpcio echo "
                 f"({fmt_t(echo).strip()} vs {fmt_t(bare).strip()}; target 1.2x)")
    for label, key in (("round trip", "telemetry/"), ("inside the worker", "telemetry/worker-")):
        off = by[(key + "no-watcher", 16)]["median_s"]
        on = by[(key + "one-watcher", 16)]["median_s"]
        lines.append(f"telemetry overhead, {label} (median, one watcher vs none): {100 * (on - off) / off:+.2f} %")
    lines.append(f"(the watcher received {by[('telemetry/one-watcher', 16)]['events_seen']} events)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 100])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--device", default="cpu", help="the worker's --device (default cpu: the shm path)")
    ap.add_argument("--telemetry-only", action="store_true", help="only the echo and telemetry cases")
    args = ap.parse_args()
    report = run(args.sizes_mb, args.quick, args.device, args.telemetry_only)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(table(report))


if __name__ == "__main__":
    main()
