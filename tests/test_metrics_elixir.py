"""The Elixir bridge's `Sidecar.Metrics` text parses as Prometheus exposition (prometheus-client's own
parser) and holds the known workload of bridge/test/metrics_test.exs: a real BEAM, real workers, a
real segfault. The ExUnit test scrapes its `:httpd` endpoint and writes the body where we ask."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

BRIDGE = Path(__file__).resolve().parent.parent / "bridge"
POOL = "sidecar_metrics_test_pool"


def test_elixir_metrics_text_parses_as_prometheus_exposition(tmp_path: Path) -> None:
    mix = shutil.which("mix")
    assert mix is not None, "Elixir is not installed (no `mix`): scripts/install.sh installs it"
    out = tmp_path / "metrics.txt"
    env = {**os.environ, "MIX_ENV": "test", "HEX_OFFLINE": "1", "SIDECAR_PYTHON": sys.executable,
           "SIDECAR_METRICS_TEXT_OUT": str(out)}
    run = subprocess.run([mix, "test", "test/metrics_test.exs"], cwd=BRIDGE, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, f"mix test failed:\n{(run.stdout + run.stderr)[-6000:]}"
    text = out.read_text()

    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["sidecar_calls"].type == "counter"
    assert families["sidecar_call_duration_seconds"].type == "histogram"
    assert families["sidecar_worker_rss_bytes"].type == "gauge"

    def value(family: str, sample: str, **labels: str) -> float:
        hits = [s.value for s in families[family].samples
                if s.name == sample and s.labels == {"pool": POOL, **labels}]
        assert len(hits) == 1, (sample, labels, families[family].samples)
        return hits[0]

    assert value("sidecar_calls", "sidecar_calls_total", op="add", outcome="ok") == 4
    assert value("sidecar_calls", "sidecar_calls_total", op="add", outcome="SHAPE_MISMATCH") == 1
    assert value("sidecar_worker_crashes", "sidecar_worker_crashes_total", classification="segfault") == 1
    assert value("sidecar_worker_restarts", "sidecar_worker_restarts_total") == 1
    assert value("sidecar_call_duration_seconds", "sidecar_call_duration_seconds_count", op="add") == 5
    buckets = [(s.labels["le"], s.value) for s in families["sidecar_call_duration_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["op"] == "add" and s.labels["pool"] == POOL]
    assert buckets[-1] == ("+Inf", 5)
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    # the same `le` spelling as the Python exporter, so both hosts' series aggregate
    assert [le for le, _ in buckets][:3] == ["0.0001", "0.00025", "0.0005"]
    assert value("sidecar_call_duration_seconds", "sidecar_call_duration_seconds_sum", op="add") > 0
    assert value("sidecar_worker_rss_bytes", "sidecar_worker_rss_bytes", slot="0") > 0
