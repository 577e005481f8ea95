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
from tests.workers import ROOT, pid_gone, wait_until

HOST = textwrap.dedent("""
    import json, os, signal, sys, threading, time
    import numpy as np
    from sidecar.host.pool import Pool

    pool = Pool(2, debug_ops=True, use_template=sys.argv[1] != "cold", health_interval_s=0, device="cpu")
    if sys.argv[1] == "template-restarted":  # the template died first; a new one guards the old workers
        dead = pool.template_pid
        os.kill(dead, signal.SIGKILL)
        while pool.template_pid in (None, dead):
            time.sleep(0.01)
    x = np.ones(1 << 18, np.float32)
    held = [pool.call("identity", x, placement="shm") for _ in range(4)]  # worker-owned outputs
    print(json.dumps({"run": pool.run_id, "workers": [r.pid for r in pool.status()],
                      "template": pool.template_pid, "addresses": [r.address for r in pool.status()]}),
          flush=True)
    threading.Event().wait(120)  # until the test kills us
""")


@pytest.mark.parametrize("mode", ["template", "cold", "template-restarted"])
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
        if mode == "template-restarted":  # orphans of the dead template, watched by the new one
            assert all(psutil.Process(w).ppid() not in (template, host.pid) for w in workers)

        os.kill(host.pid, signal.SIGKILL)
        t0 = time.monotonic()
        host.wait(10)
        procs = [*workers, template]
        wait_until(lambda: all(pid_gone(p) for p in procs))
        workers_gone_s = time.monotonic() - t0
        wait_until(lambda: not reaper.list_segments(run) and not os.path.exists(sock_dir))
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


# A host that speaks the template's protocol by hand, so that it can die with the template's answer
# to a spawn request unread. The worker it asks for serves the port protocol on a pipe the host holds,
# so it lives until the host is gone: the template's first word from the socket is then ECONNRESET.
UNREAD_HOST = textwrap.dedent("""
    import json, os, select, signal, socket, subprocess, sys, time
    from sidecar.dataplane import segments
    run, sock_dir = sys.argv[1], sys.argv[2]
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    template = subprocess.Popen([sys.executable, "-m", "sidecar.host.template_process", "--fd", str(child.fileno()),
                                 "--run-id", run, "--host-pid", str(os.getpid()), "--sock-dir", sock_dir],
                                pass_fds=[child.fileno()], start_new_session=True)
    child.close()
    assert json.loads(parent.recv(1 << 20))["op"] == "ready"
    segment = segments.create_segment(4096, run)  # the host's shared memory, for the template to reap
    null = os.open(os.devnull, os.O_RDWR)
    stdin_r, stdin_w = os.pipe()
    request = {"op": "spawn", "id": 1, "argv": ["serve", "--stdio", "--device", "cpu", "--run-id", run],
               "env": dict(os.environ), "cwd": None}
    socket.send_fds(parent, [json.dumps(request).encode()], [stdin_r, null, null])
    select.select([parent], [], [], 30)  # an answer is waiting: leave it unread
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until the template waits for its next request
        with open(f"/proc/{template.pid}/wchan") as f:
            if f.read() == "do_epoll_wait":
                break
        time.sleep(0.005)
    print(template.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_template_cleans_up_when_the_host_dies_with_messages_unread(tmp_path) -> None:
    """The template's socket reports ECONNRESET (not EOF) when the host dies with unread messages:
    the template must still reap the run's segments and remove the socket directory."""
    from tests.workers import run_id

    run = run_id()
    sock_dir = tmp_path / "sockets"
    sock_dir.mkdir()
    host = subprocess.run([sys.executable, "-c", UNREAD_HOST, run, str(sock_dir)], stdout=subprocess.PIPE,
                          text=True, cwd=ROOT, timeout=60)
    assert host.returncode == -signal.SIGKILL
    template = int(host.stdout.split()[0])
    wait_until(lambda: pid_gone(template))
    assert not reaper.list_segments(run), "the host's segment was left behind"
    assert not sock_dir.exists(), "the socket directory was left behind"
