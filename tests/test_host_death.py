"""Kill -9 the host (a subprocess running a pool): no worker, no template, no segment may survive it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from sidecar.dataplane import reaper
from tests.workers import ROOT, pid_gone

HOST = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from sidecar.host.pool import Pool

    pool = Pool(2, debug_ops=True, use_template=sys.argv[1] == "template", health_interval_s=0, device="cpu")
    x = np.ones(1 << 18, np.float32)
    held = [pool.call("identity", x, placement="shm") for _ in range(4)]  # worker-owned outputs
    print(json.dumps({"run": pool.run_id, "workers": [r.pid for r in pool.status()],
                      "template": pool.template_pid, "addresses": [r.address for r in pool.status()]}),
          flush=True)
    time.sleep(120)
""")


@pytest.mark.parametrize("mode", ["template", "cold"])
def test_killing_the_host_leaves_nothing_behind(mode: str) -> None:
    host = subprocess.Popen([sys.executable, "-c", HOST, mode], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert host.stdout is not None
        line = host.stdout.readline()
        assert line, "the host did not start its pool"
        info = json.loads(line)
        run, workers, template = info["run"], info["workers"], info["template"]
        sock_dir = os.path.dirname(info["addresses"][0][len("unix:"):])
        assert os.path.isdir(sock_dir)
        owners = {s.pid for s in reaper.list_segments(run)}
        assert host.pid in owners  # the host's input arena
        assert owners & set(workers)  # outputs in the workers' arenas
        if mode == "template":  # forked from the template, not children of the host
            assert all(psutil.Process(w).ppid() == template for w in workers)

        os.kill(host.pid, signal.SIGKILL)
        t0 = time.monotonic()
        host.wait(10)
        procs = [*workers, template]
        while not all(pid_gone(p) for p in procs) and time.monotonic() - t0 < 10:
            time.sleep(0.005)
        workers_gone_s = time.monotonic() - t0
        while (reaper.list_segments(run) or os.path.exists(sock_dir)) and time.monotonic() - t0 < 10:
            time.sleep(0.005)
        shm_clean_s = time.monotonic() - t0
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
    assert all(pid_gone(p) for p in procs), [p for p in procs if not pid_gone(p)]
    assert not reaper.list_segments(run)
    assert not os.path.exists(sock_dir)  # nor the workers' socket files
    print(f"{mode}: workers and template gone {workers_gone_s * 1000:.0f} ms after the host's SIGKILL, "
          f"/dev/shm and sockets clean after {shm_clean_s * 1000:.0f} ms")
    assert workers_gone_s < 1.0
