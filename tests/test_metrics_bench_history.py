"""benchmarks/run_all.py: runs a benchmark's quick mode for real (bench_metrics: a real pool), writes
the per-commit JSON (commit, machine, figures, the benchmark's whole JSON) and draws the history PNG."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_ALL = ROOT / "benchmarks" / "run_all.py"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def test_run_all_writes_one_json_per_commit_and_draws_the_history(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, str(RUN_ALL), "--only", "bench_metrics", "--results-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    head = git("rev-parse", "HEAD")
    result = tmp_path / f"{head[:10]}.json"
    assert str(result) in run.stdout
    doc = json.loads(result.read_text())
    assert doc["commit"]["sha"] == head and doc["commit"]["subject"] == git("show", "-s", "--format=%s", head)
    assert doc["machine"]["cpus"] >= 1 and doc["machine"]["python"] == ".".join(map(str, sys.version_info[:3]))
    bench = doc["benchmarks"]["bench_metrics"]
    assert bench["status"] == "ok" and list(doc["benchmarks"]) == ["bench_metrics"]
    assert bench["figures"]["x_metrics_on_vs_off"] == 1 + bench["result"]["overhead_ratio"]
    assert 0 < bench["figures"]["hook_us"] < 1000
    assert bench["result"]["rounds"] == 6  # --quick

    # An earlier commit's run (the same figures, another sha and date) makes a two-point history.
    older = json.loads(result.read_text())
    older["commit"].update(sha="0" * 40, short="0" * 10, date="2000-01-01T00:00:00+00:00")
    (tmp_path / f"{'0' * 10}.json").write_text(json.dumps(older))
    sys.path.insert(0, str(RUN_ALL.parent))
    try:
        import run_all
    finally:
        sys.path.remove(str(RUN_ALL.parent))
    assert [d["commit"]["short"] for d in run_all.load_history(tmp_path)] == ["0" * 10, head[:10]]
    png = run_all.plot_history(tmp_path)
    assert png == tmp_path / "history.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
