"""Elixir host benchmark: a tensor's round trip from a BEAM VM through a sidecar worker and back.

Runs bridge/bench/roundtrip.exs (`mix run`) with this interpreter as the workers' Python and prints
its table, side by side per size (float32, identity op, one worker, the port transport):

  shm_reused   the VM overwrites a segment it already has; only the descriptor crosses the port;
               the output is read back from the worker's segment and its lease released
  shm_fresh    the same with a new VM segment per call (fresh tmpfs pages)
  shm_refs     descriptors only: no byte copied by the VM (output read lazily, lease released)
  inline       the same bytes inside the {:packet, 4} port messages both ways

Ratios are against shm_reused. Run: python benchmarks/bench_elixir.py [--sizes 1MB,100MB]
[--repeat N] [--quick] [--json]. Needs Elixir (`mix`); without it, it says so and exits 1.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BRIDGE = ROOT / "bridge"


def run(sizes: str, repeat: int | None) -> dict:
    mix = shutil.which("mix")
    if mix is None:
        sys.exit("Elixir is not installed (no `mix`): apt-get install -y elixir")
    args = [mix, "run", "bench/roundtrip.exs", "--json", "--sizes", sizes]
    if repeat:
        args += ["--repeat", str(repeat)]
    env = {**os.environ, "SIDECAR_PYTHON": sys.executable, "HEX_OFFLINE": "1", "MIX_ENV": "dev"}
    proc = subprocess.run(args, cwd=BRIDGE, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"bench/roundtrip.exs failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("{"))
    return json.loads(line)


def table(result: dict) -> str:
    out = ["Elixir VM -> sidecar worker (port transport) -> Elixir VM; identity, float32, one worker",
           f"{'size':<7}{'mode':<12}{'median ms':>11}{'p90 ms':>10}{'GB/s':>8}{'x shm_reused':>14}"]
    for r in result["rows"]:
        gbps = "-" if r["mode"] == "shm_refs" else f"{2 * r['bytes'] / (r['median_us'] * 1e3):.2f}"
        out.append(f"{r['size']:<7}{r['mode']:<12}{r['median_us'] / 1e3:>11.3f}{r['p90_us'] / 1e3:>10.3f}"
                   f"{gbps:>8}{r['vs_shm_reused']:>14.2f}")
    sizes = sorted({r["size"] for r in result["rows"]}, key=lambda s: next(x["bytes"] for x in result["rows"]
                                                                          if x["size"] == s))
    for size in sizes:
        rows = {r["mode"]: r for r in result["rows"] if r["size"] == size}
        if "inline" in rows and "shm_reused" in rows:
            out.append(f"{size}: bytes inside the port message take "
                       f"{rows['inline']['median_us'] / rows['shm_reused']['median_us']:.1f}x the shared-memory "
                       f"round trip")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1MB,100MB", help="comma-separated: 1MB, 10MB, 100MB")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per mode and size")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--quick", action="store_true", help="1MB only, 50 calls per mode (benchmarks/run_all.py)")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.repeat = "1MB", 50
    result = run(args.sizes, args.repeat)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
