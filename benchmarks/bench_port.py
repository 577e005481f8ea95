"""The small call through the port transport against the transport alone, side by side in one run.

Two peer processes, each reached through a pair of pipes with {:packet, 4} frames, driven from this
process the way a BEAM port drives them (the host side is Python here: the same frames, without the
VM's own costs):

  port/bare-echo      a process that reads each frame and writes it straight back: what the
                      framing and the two process hops cost (the floor of any port round trip)
  port/tiny-identity  `sidecar serve --stdio`: {:call, id, "identity", [16-byte inline tensor], %{}}
                      answered with {:ok, id, result}
  port/list-ops       a control request that runs no op (a control-thread hop, no dispatcher)

Both cases encode the same request term and decode what comes back, so the host's ETF work is on
both sides of the ratio. Blocks of the cases are interleaved, so that drift of a shared machine
hits all alike.

Usage: .venv/bin/python benchmarks/bench_port.py [--calls 2000] [--quick] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from sidecar import etf  # noqa: E402
from sidecar.etf import Atom  # noqa: E402

ECHO = r"""
import os, struct
read, write = os.read, os.write
def exact(n):
    buf = b""
    while len(buf) < n:
        chunk = read(0, n - len(buf))
        if not chunk:
            raise SystemExit(0)
        buf += chunk
    return buf
while True:
    header = exact(4)
    body = exact(struct.unpack(">I", header)[0])
    write(1, header + body)
"""
TARGET = 1.2  # the goal: the port identity within this many bare echoes


class Peer:
    """A child process spoken to with {:packet, 4} frames on its stdin/stdout."""

    def __init__(self, argv: list[str], ready: bool) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     cwd=ROOT, bufsize=0)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in, self._out = self.proc.stdin.fileno(), self.proc.stdout.fileno()
        if ready:
            tag = self.read()[0]
            assert tag == "ready", tag

    def write(self, data: bytes) -> None:
        os.write(self._in, struct.pack(">I", len(data)) + data)

    def _exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = os.read(self._out, n - len(buf))
            if not chunk:
                raise EOFError("peer closed its stdout")
            buf += chunk
        return buf

    def read(self) -> Any:
        (n,) = struct.unpack(">I", self._exact(4))
        return etf.decode(self._exact(n))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def round_trip(peer: Peer, make: Callable[[int], Any]) -> Callable[[int], Any]:
    def one(i: int) -> Any:
        peer.write(etf.encode(make(i)))
        return peer.read()
    return one


def run(calls: int, blocks: int) -> dict[str, Any]:
    python = sys.executable
    worker = Peer([python, "-m", "sidecar", "serve", "--stdio", "--device", "cpu", "--threads", "1"], ready=True)
    echo = Peer([python, "-c", ECHO], ready=False)
    tiny = np.arange(4, dtype=np.float32)
    tensor = (Atom("tensor"), {Atom("dtype"): "float32", Atom("shape"): [4], Atom("data"): tiny.tobytes()})

    def call(i: int) -> Any:
        return (Atom("call"), i, "identity", [tensor], {})

    cases: dict[str, Callable[[int], Any]] = {
        "port/bare-echo": round_trip(echo, call),
        "port/tiny-identity": round_trip(worker, call),
        "port/list-ops": round_trip(worker, lambda i: (Atom("list_ops"), i)),
    }
    reply = cases["port/tiny-identity"](0)  # correctness first: the identity answers the same bytes
    assert reply[0] == "ok" and reply[2][Atom("outputs")][0][1][Atom("data")] == tiny.tobytes(), reply
    assert cases["port/bare-echo"](1) == etf.decode(etf.encode(call(1)))
    samples: dict[str, list[float]] = {name: [] for name in cases}
    try:
        for _ in range(blocks):
            for name, fn in cases.items():
                for i in range(20):  # warm-up of the block
                    fn(i)
                for i in range(calls // blocks):
                    t0 = time.perf_counter_ns()
                    fn(i)
                    samples[name].append((time.perf_counter_ns() - t0) / 1e3)
    finally:
        worker.close()
        echo.close()
    results = []
    for name, xs in samples.items():
        s = sorted(xs)
        results.append({"case": name, "n": len(s), "median_us": statistics.median(s),
                        "p90_us": s[int(len(s) * 0.9)], "min_us": s[0]})
    by = {r["case"]: r for r in results}
    ratio = by["port/tiny-identity"]["median_us"] / by["port/bare-echo"]["median_us"]
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "results": results, "identity_vs_echo": ratio, "target": TARGET}


def table(report: dict[str, Any]) -> str:
    echo = next(r for r in report["results"] if r["case"] == "port/bare-echo")["median_us"]
    lines = [f"{report['cpus']} CPUs, python {report['python']}; {{:packet, 4}} frames over pipes, "
             "host side in Python", "",
             f"{'case':<22}{'median':>12}{'p90':>12}{'min':>12}{'x echo':>9}", "-" * 67]
    for r in report["results"]:
        lines.append(f"{r['case']:<22}{r['median_us']:>9.1f} us{r['p90_us']:>9.1f} us{r['min_us']:>9.1f} us"
                     f"{r['median_us'] / echo:>8.2f}x")
    lines += ["", f"16-byte identity through the port: {report['identity_vs_echo']:.2f}x a bare {{:packet, 4}} "
                  f"echo (target {report['target']}x)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=3000, help="timed calls per case")
    ap.add_argument("--quick", action="store_true", help="600 calls per case")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    calls = 600 if args.quick else args.calls
    report = run(calls, blocks=10)
    print(json.dumps(report, indent=2) if args.json else table(report))


if __name__ == "__main__":
    main()
