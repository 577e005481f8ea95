"""Elixir host benchmark: a tensor's round trip from a BEAM VM through a sidecar worker and back,
and how fast a killed bridge worker is replaced.

Runs bridge/bench/roundtrip.exs (`mix run`) with this interpreter as the workers' Python and prints
its table, side by side per size (float32, identity op, one worker, the port transport; ratios are
against one memcpy of the same bytes):

  binary_copy            :binary.copy/1 of the bytes: one memcpy, the floor
  nif_alloc_write_alias  NIF: write/3 into an alloc/3 segment (one copy), identity with
                         alias_inputs, Tensor.view/1 of the result: one copy in all
  nif_alloc_write        the same, the worker copying into its arena; the result a zero-copy binary
  nif_from_binary        NIF: from_binary/3 (a fresh segment, one copy) + a zero-copy result
  nif_zero_copy_input    the previous result binary as the input (no VM copy) + a zero-copy result
  descriptors_only       the input already in a segment, aliased: only descriptors move
  file_path              without the NIF: pwrite into a reused segment, pread of the output
  inline                 the same bytes inside the {:packet, 4} port messages both ways

With --replace N (and --spare N, --cold M) it kills a worker of a 2-worker pool N times and reports
the median time until its replacement is ready: forked from the template, taken over from a warm
spare, or started cold; and the memory of each setup (RSS, and PSS, which splits shared pages).

Run: python benchmarks/bench_elixir.py [--sizes 1MB,100MB,1GB] [--repeat N] [--modes a,b]
[--replace N] [--spare N] [--cold M] [--quick] [--json]. Needs Elixir (`mix`); without it, it exits 1.
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
MIB = 1 << 20


def run(args: argparse.Namespace) -> dict:
    mix = shutil.which("mix")
    if mix is None:
        sys.exit("Elixir is not installed (no `mix`): apt-get install -y elixir")
    cmd = [mix, "run", "bench/roundtrip.exs", "--json", "--sizes", args.sizes]
    for flag in ("repeat", "modes", "replace", "spare", "cold"):
        value = getattr(args, flag)
        if value:
            cmd += [f"--{flag}", str(value)]
    env = {**os.environ, "SIDECAR_PYTHON": sys.executable, "HEX_OFFLINE": "1",
           "MIX_ENV": os.environ.get("MIX_ENV", "dev")}
    proc = subprocess.run(cmd, cwd=BRIDGE, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        sys.exit(f"bench/roundtrip.exs failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("{"))
    return json.loads(line)


def table(result: dict) -> str:
    out = ["Elixir VM -> sidecar worker (port transport) -> Elixir VM; identity, float32, one worker",
           f"{'size':<7}{'mode':<23}{'median ms':>11}{'p90 ms':>10}{'x memcpy':>10}"]
    for r in result["rows"]:
        ratio = "-" if r.get("vs_memcpy") is None else f"{r['vs_memcpy']:.2f}"
        out.append(f"{r['size']:<7}{r['mode']:<23}{r['median_us'] / 1e3:>11.3f}{r['p90_us'] / 1e3:>10.3f}{ratio:>10}")
    by_size: dict[str, dict[str, dict]] = {}
    for r in result["rows"]:
        by_size.setdefault(r["size"], {})[r["mode"]] = r
    for size, rows in by_size.items():
        if "file_path" in rows and "nif_alloc_write" in rows:
            out.append(f"{size}: the NIF's alloc+write round trip takes "
                       f"{rows['nif_alloc_write']['median_us'] / rows['file_path']['median_us']:.2f}x the file path's")
    if result.get("replacement"):
        out += ["", "replacement of a killed worker (2-worker pool)",
                f"{'via':<7}{'kills':>6}{'exit->ready median ms':>23}{'p90 ms':>9}{'kill->served ms':>17}"
                f"{'workers PSS MiB':>17}{'template PSS MiB':>18}"]
        for r in result["replacement"]:
            out.append(f"{r['mode']:<7}{r['count']:>6}{r['median_ms']:>23.1f}{r['p90_ms']:>9.1f}"
                       f"{r['served_median_ms']:>17.1f}{r['worker_pss_bytes'] / MIB:>17.0f}"
                       f"{r['template_pss_bytes'] / MIB:>18.0f}")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1MB,100MB", help="comma-separated: 1MB, 10MB, 100MB, 1GB")
    p.add_argument("--repeat", type=int, default=None, help="timed calls per mode and size")
    p.add_argument("--modes", default=None, help="comma-separated subset of the modes")
    p.add_argument("--replace", type=int, default=0, help="kills of a worker replaced by a fork")
    p.add_argument("--spare", type=int, default=0, help="kills of a worker replaced by a warm spare")
    p.add_argument("--cold", type=int, default=0, help="kills of a worker replaced by a cold start")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--quick", action="store_true", help="1MB only, 50 calls per mode (benchmarks/run_all.py)")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.repeat = "1MB", 50
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
