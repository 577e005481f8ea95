"""Every benchmark's quick mode in one command, one JSON per commit, and the history of the key ratios.

    .venv/bin/python benchmarks/run_all.py              # run all, write results/<commit>.json, draw the plot
    .venv/bin/python benchmarks/run_all.py --only bench_metrics,bench_grpc
    .venv/bin/python benchmarks/run_all.py --plot-only  # redraw results/history.png from the JSON files

Each benchmark runs as `python benchmarks/<name>.py --quick --json` in its own process (a crash or a
missing tool fails that benchmark, not the run). The result file holds the commit (sha, date,
subject, whether the tree had uncommitted changes), the machine, and per benchmark its status,
seconds, key figures and the benchmark's whole JSON. A second run on the same commit replaces the
file. `history.png` draws each key figure over the commits in the directory, oldest first, so a
regression shows as a step. Quick modes take few samples: read single points with care, trends and
steps are what the plot is for.

Needs matplotlib for the plot (`pip install -e '.[bench]'`, also in the test extra).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
BENCHMARKS = ("bench_dataplane", "bench_grpc", "bench_port", "bench_pool", "bench_elixir", "bench_cuda_ipc",
              "bench_metrics", "bench_resident", "bench_stream")
TIMEOUT_S = 900

Figures = dict[str, float]


# ---------------------------------------------------------------------------------------------------
# key figures of each benchmark's JSON (name -> value); "x_" names are ratios, drawn in the plot


def _dataplane(doc: dict[str, Any]) -> Figures:
    by = {(r["size"], r["scenario"]): r for r in doc["results"]}
    out: Figures = {}
    if ("100MB", "arena_copy") in by:
        out["x_arena_copy_vs_memcpy_100MB"] = by[("100MB", "arena_copy")]["vs_memcpy"]
    if ("100MB", "pickle_pipe") in by:
        out["x_pickle_vs_arena_view_100MB"] = by[("100MB", "pickle_pipe")]["vs_arena_view"]
    if ("1MB", "arena_view") in by:
        out["arena_view_1MB_us"] = by[("1MB", "arena_view")]["median_us"]
    return out


def _grpc(doc: dict[str, Any]) -> Figures:
    by = {(r["case"], r["bytes"]): r["median_s"] for r in doc["results"]}
    out: Figures = {"echo_tiny_us": by[("echo/tiny-identity", 16)] * 1e6}
    bare = next((r["median_s"] for r in doc["results"] if r["case"] == "echo/bare-grpc"), None)
    if bare:
        out["x_identity_vs_bare_grpc_echo"] = by[("echo/tiny-identity", 16)] / bare
    mb = 1 << 20
    if ("zero-copy/lease", mb) in by and ("bytes-in-message", mb) in by:
        out["x_bytes_in_message_vs_lease_1MB"] = by[("bytes-in-message", mb)] / by[("zero-copy/lease", mb)]
    if ("telemetry/one-watcher", 16) in by:
        out["x_telemetry_watcher_round_trip"] = by[("telemetry/one-watcher", 16)] / by[("telemetry/no-watcher", 16)]
    return out


def _port(doc: dict[str, Any]) -> Figures:
    by = {r["case"]: r["median_us"] for r in doc["results"]}
    return {"port_tiny_identity_us": by["port/tiny-identity"], "x_port_identity_vs_echo": doc["identity_vs_echo"]}


def _pool(doc: dict[str, Any]) -> Figures:
    modes = {m["mode"]: m for m in doc["replacement"]}
    out: Figures = {f"replacement_{k}_ms": m["serving_median_ms"] for k, m in modes.items()}
    if "cold" in modes and "template" in modes:
        out["x_cold_vs_template_replacement"] = modes["cold"]["serving_median_ms"] / modes["template"]["serving_median_ms"]
    rows = {(r["setup"], r["threads"]): r["calls_per_s"] for r in doc.get("throughput", [])}
    bare = rows.get(("bare Client, 1 worker", 1))
    if bare and ("Pool(1)", 1) in rows:
        out["x_pool1_vs_bare_client_calls"] = rows[("Pool(1)", 1)] / bare
    return out


def _elixir(doc: dict[str, Any]) -> Figures:
    out: Figures = {}
    for r in doc["rows"]:
        if r.get("vs_memcpy") is not None and r["mode"] in ("nif_alloc_write_alias", "file_path", "inline"):
            out[f"x_{r['mode']}_vs_memcpy_{r['size']}"] = r["vs_memcpy"]
        if r["mode"] == "descriptors_only":
            out[f"descriptors_only_{r['size']}_us"] = r["median_us"]
    return out


def _cuda_ipc(doc: dict[str, Any]) -> Figures:
    out: Figures = {}
    for r in doc.get("results", []):
        if r["scenario"] == "ipc_roundtrip" and "median_us" in r:
            out[f"ipc_roundtrip_{r['size']}_us"] = r["median_us"]
        if r["scenario"] == "shm_staging" and r.get("x_ipc") is not None:
            out[f"x_shm_staging_vs_ipc_{r['size']}"] = r["x_ipc"]
    return out


def _metrics(doc: dict[str, Any]) -> Figures:
    return {"x_metrics_on_vs_off": 1 + doc["overhead_ratio"], "hook_us": doc["hook_us"]}


def _resident(doc: dict[str, Any]) -> Figures:
    out: Figures = {"x_load_per_call_vs_resident": doc["x_load_per_call_vs_resident"]}
    for m in doc["recovery"]:
        out[f"restored_serving_{m['mode']}_ms"] = m["serving"]["median_ms"]
    return out


def _stream(doc: dict[str, Any]) -> Figures:
    out: Figures = {}
    for r in doc["results"]:
        if r["case"] == "stream/blocking":
            out[f"x_stream_vs_unary_{r['size']}"] = r["x_vs_unary"]
            out[f"stream_first_chunk_{r['size']}_ms"] = r["first_chunk_ms"]
    for h in doc["health_while_busy"]:
        if h["op"] in ("spin", "matmuls"):
            out[f"health_p99_during_{h['op']}_ms"] = h["p99_ms"]
    return out


FIGURES: dict[str, Callable[[dict[str, Any]], Figures]] = {
    "bench_dataplane": _dataplane, "bench_grpc": _grpc, "bench_port": _port, "bench_pool": _pool, "bench_elixir": _elixir,
    "bench_cuda_ipc": _cuda_ipc, "bench_metrics": _metrics, "bench_resident": _resident,
    "bench_stream": _stream}


# ---------------------------------------------------------------------------------------------------
# running


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def commit_info() -> dict[str, Any]:
    sha = _git("rev-parse", "HEAD")
    return {"sha": sha, "short": sha[:10], "date": _git("show", "-s", "--format=%cI", sha),
            "subject": _git("show", "-s", "--format=%s", sha),
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))}


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": len(os.sched_getaffinity(0)), "cpu_model": cpu,
                            "load_1m": round(os.getloadavg()[0], 2)}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def run_one(name: str) -> dict[str, Any]:
    t0 = time.monotonic()
    cmd = [sys.executable, str(HERE / f"{name}.py"), "--quick", "--json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "seconds": round(time.monotonic() - t0, 1),
                "error": f"timed out after {TIMEOUT_S} s"}
    seconds = round(time.monotonic() - t0, 1)
    if proc.returncode != 0:
        return {"status": "failed", "seconds": seconds, "error": f"exit {proc.returncode}",
                "stderr_tail": (proc.stdout + proc.stderr).splitlines()[-20:]}
    try:
        doc = json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError as exc:
        return {"status": "failed", "seconds": seconds, "error": f"no JSON on stdout: {exc}",
                "stderr_tail": proc.stdout.splitlines()[-20:]}
    if doc.get("cuda") is False:  # bench_cuda_ipc on a machine without CUDA: nothing measured
        return {"status": "skipped", "seconds": seconds, "reason": doc.get("reason"), "figures": {}}
    try:
        figures = FIGURES[name](doc)
    except (KeyError, TypeError, ZeroDivisionError, statistics.StatisticsError) as exc:
        return {"status": "failed", "seconds": seconds, "error": f"unexpected JSON: {exc!r}", "result": doc}
    return {"status": "ok", "seconds": seconds, "figures": figures, "result": doc}


def run_all(names: list[str], results: Path) -> Path:
    commit = commit_info()
    doc: dict[str, Any] = {"commit": commit, "machine": machine_info(),
                           "run_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "benchmarks": {}}
    for name in names:
        print(f"# {name} --quick ...", file=sys.stderr, flush=True)
        doc["benchmarks"][name] = got = run_one(name)
        shown = ", ".join(f"{k}={v:.3g}" for k, v in got.get("figures", {}).items())
        print(f"#   {got['status']} in {got['seconds']} s {shown or got.get('error') or got.get('reason') or ''}",
              file=sys.stderr, flush=True)
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{commit['short']}.json"
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------
# history


def load_history(results: Path) -> list[dict[str, Any]]:
    docs = []
    for p in sorted(results.glob("*.json")):
        try:
            docs.append(json.loads(p.read_text()))
        except ValueError:
            print(f"# skipping {p.name}: not JSON", file=sys.stderr)
    return sorted(docs, key=lambda d: (d["commit"]["date"], d["run_at"]))


def plot_history(results: Path, out: Path | None = None) -> Path:
    """One panel per benchmark: each ratio (x_...) over the commits, oldest left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = load_history(results)
    if not docs:
        raise SystemExit(f"no results in {results}")
    labels = [d["commit"]["short"][:7] + ("*" if d["commit"]["dirty"] else "") for d in docs]
    panels: dict[str, dict[str, list[float | None]]] = {}
    for i, d in enumerate(docs):
        for bench, got in d["benchmarks"].items():
            for key, v in got.get("figures", {}).items():
                if key.startswith("x_"):
                    series = panels.setdefault(bench, {}).setdefault(key[2:], [None] * len(docs))
                    series[i] = v
    names = sorted(panels)
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.3 * max(1, len(names))), squeeze=False)
    xs = list(range(len(docs)))
    for ax, bench in zip(axes[:, 0], names, strict=True):
        for key, values in sorted(panels[bench].items()):
            pts = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
            if pts:  # the newest figure, written out
                ax.annotate(f"{pts[-1][1]:.3g}", pts[-1], textcoords="offset points", xytext=(5, 3),
                            fontsize=7, color=line.get_color())
        ax.set_title(bench, fontsize=9, loc="left")
        ax.set_xticks(xs, labels, fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        values = [v for series in panels[bench].values() for v in series if v is not None and v > 0]
        if values and max(values) / min(values) > 20:  # ratios of 1x and 10000x share the panel
            ax.set_yscale("log")
            ax.set_ylabel("ratio (log)", fontsize=7)
        else:  # from zero, so that noise of a few percent looks like what it is
            ax.set_ylim(0, max(values, default=1) * 1.25)
            ax.set_ylabel("ratio", fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    fig.suptitle(f"benchmark ratios by commit ({len(docs)} runs; * = uncommitted changes)", fontsize=10)
    fig.tight_layout()
    out = out or results / "history.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help=f"comma-separated, of {', '.join(BENCHMARKS)}")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON and the plot go")
    ap.add_argument("--plot-only", action="store_true", help="only redraw history.png from the JSON files")
    ap.add_argument("--no-plot", action="store_true", help="do not draw history.png")
    args = ap.parse_args(argv)
    names = list(BENCHMARKS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
    failed: list[str] = []
    if not args.plot_only:
        path = run_all(names, args.results_dir)
        print(path)
        doc = json.loads(path.read_text())
        failed = [n for n, b in doc["benchmarks"].items() if b["status"] == "failed"]
        if failed:
            print(f"# failed: {', '.join(failed)} (see their error in {path.name})", file=sys.stderr)
    if not args.no_plot:
        print(plot_history(args.results_dir))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
