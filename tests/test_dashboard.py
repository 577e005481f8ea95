"""The dashboard page in a real headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) against a real pool: it lists the workers, a real segfault shows in the event timeline
within seconds, the memory chart has points, the recent calls are listed; a screenshot is saved
($SIDECAR_DASHBOARD_SCREENSHOT, else in the test's tmp dir). Also the JSON endpoints it polls."""
from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

from sidecar.errors import ShapeMismatch, WorkerCrashed
from sidecar.host.pool import Pool

CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1500,1250")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (scripts/install.sh installs them "
                    "with apt-get; it could not here)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")  # fresh, never the user's
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    try:
        yield drv
    finally:
        drv.quit()


def get_json(address: str, path: str) -> Any:
    with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as resp:
        assert resp.headers["Content-Type"] == "application/json"
        return json.loads(resp.read())


def test_dashboard_shows_workers_calls_memory_and_a_crash_in_chromium(browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def rows(css: str) -> list[Any]:
        return browser.find_elements(By.CSS_SELECTOR, css)

    def chart_points() -> int:
        charts = rows("svg.memory-chart[data-device='cpu']")
        return int(charts[0].get_attribute("data-points")) if charts else 0

    with Pool(2, debug_ops=True) as pool:
        pool.observer.profile_memory(interval_s=0.25)
        address = pool.serve_metrics("127.0.0.1:0")
        browser.get(f"http://{address}/")
        wait = WebDriverWait(browser, 30)  # a deadline for a stuck page, not a timing assertion

        pids = {str(s.pid) for s in pool.status()}
        wait.until(lambda d: {r.get_attribute("data-pid") for r in rows("#workers tbody tr")} == pids)
        assert {r.get_attribute("data-state") for r in rows("#workers tbody tr")} == {"ready"}
        assert "closed" in browser.find_element(By.ID, "breaker").get_attribute("class")

        wait.until(lambda d: chart_points() > 0)
        before = chart_points()
        x = np.random.default_rng(0).standard_normal((512, 512), dtype=np.float32)
        for _ in range(6):
            pool.call("matmul", x, x)
            pool.call("relu", x)
        with pytest.raises(ShapeMismatch):
            pool.call("matmul", x, np.ones((3, 3), np.float32))
        wait.until(lambda d: len(rows("#calls tbody tr")) == 13)
        assert len(rows("#calls tbody tr[data-outcome='SHAPE_MISMATCH']")) == 1
        assert {r.get_attribute("data-op") for r in rows("#calls tbody tr")} == {"matmul", "relu"}
        wait.until(lambda d: chart_points() > before)  # the chart keeps growing while the pool runs
        lines = {p.get_attribute("data-pid") for p in rows("svg.memory-chart[data-device='cpu'] polyline")}
        assert pids <= lines

        with pytest.raises(WorkerCrashed):
            pool.call("debug.segfault")
        # The crash reaches the timeline within seconds (the page polls every second).
        WebDriverWait(browser, 10).until(
            lambda d: rows("#timeline li[data-event='crash'][data-classification='segfault']"))
        wait.until(lambda d: rows("#timeline li[data-event='restart']"))
        assert rows("#timeline-strip rect[data-event='crash']")
        assert pool.wait_ready(60)
        new_pids = {str(s.pid) for s in pool.status()}
        wait.until(lambda d: {r.get_attribute("data-pid") for r in rows("#workers tbody tr")} == new_pids)
        crashed = [r for r in rows("#workers tbody tr") if "segfault" in r.text]
        assert len(crashed) == 1  # the slot that crashed shows its last exit
        wait.until(lambda d: rows("#calls tbody tr[data-outcome='WORKER_CRASHED']"))
        wait.until(lambda d: len(rows("svg.memory-chart[data-device='cpu'] polyline")) == 3)  # the dead one stays

        shot = Path(os.environ.get("SIDECAR_DASHBOARD_SCREENSHOT") or tmp_path / "dashboard.png")
        assert browser.save_screenshot(str(shot))
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

        errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors

        # The JSON the page polls.
        status = get_json(address, "/api/status")
        assert status["run_id"] == pool.run_id and len(status["workers"]) == 2
        assert sum(w["crashes"] for w in status["workers"]) == 1
        calls = get_json(address, "/api/calls?since=0")
        assert calls["last"] == 14 and [c["seq"] for c in calls["calls"]] == list(range(1, 15))
        assert get_json(address, f"/api/calls?since={calls['last']}")["calls"] == []
        ok = calls["calls"][0]
        assert ok["op"] == "matmul" and ok["outcome"] == "ok" and ok["bytes_in"] == 2 * x.nbytes
        assert ok["compute_ms"] > 0 and ok["total_ms"] >= ok["worker_ms"] >= ok["compute_ms"]
        events = get_json(address, "/api/events")["events"]
        crash = next(e for e in events if e["event"] == "crash")
        assert crash["metadata"]["classification"] == "segfault" and "stderr_tail" not in crash["metadata"]
        memory = get_json(address, "/api/memory")
        assert memory["interval_s"] == 0.25 and all(s["points"] for s in memory["series"])
        assert max(len(s["points"]) for s in memory["series"]) > 2
        assert all(len(s["points"]) <= 2 for s in get_json(address, "/api/memory?last=2")["series"])
        assert {w["device"] for w in status["workers"]} == {"cpu"}
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://{address}/api/nothing", timeout=10)
        assert missing.value.code == 404
        with pytest.raises(urllib.error.HTTPError) as escape:
            urllib.request.urlopen(f"http://{address}/static/..%2f..%2fpool.py", timeout=10)
        assert escape.value.code == 404
