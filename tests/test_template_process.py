"""The template process on its own (`python -m sidecar.host.template_process`), in launch mode as the
Elixir bridge runs it: a connection hands it three pipes, it forks a worker on them and reports the
worker's pid and exit; EOF on its stdin (the host gone) ends it and removes its directory."""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import textwrap
from typing import Any

from sidecar import etf
from sidecar.host.template_protocol import TEMPLATE_MODULE, recv, send
from tests.workers import PYTHON, ROOT, pid_gone, run_id, wait_until


def _read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        assert chunk, "the worker closed its stdout"
        data += chunk
    return data


def test_launch_mode_forks_a_worker_per_connection_and_reports_its_exit() -> None:
    run = run_id()
    template = subprocess.Popen([PYTHON, "-m", TEMPLATE_MODULE, "--listen-dir-prefix", "sc-template-test-",
                                 "--run-id", run, "--host-pid", str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
    assert template.stdin is not None and template.stdout is not None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker_pid = None
    try:
        hello: dict[str, Any] = json.loads(template.stdout.readline())
        assert hello["op"] == "ready" and hello["pid"] == template.pid and hello["threads"] == 1
        listen_dir = os.path.dirname(hello["listen"])
        assert os.stat(listen_dir).st_mode & 0o077 == 0  # only this user can connect
        conn.connect(hello["listen"])
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        send(conn, {"op": "spawn", "id": 7, "argv": ["serve", "--stdio", "--device", "cpu", "--run-id", run],
                    "env": dict(os.environ), "cwd": str(ROOT)}, [stdin_r, out_w, err_w])
        for fd in (stdin_r, out_w, err_w):
            os.close(fd)
        spawned, fds = recv(conn)
        for fd in fds:
            os.close(fd)
        assert spawned is not None and spawned["op"] == "spawned" and spawned["id"] == 7
        worker_pid = spawned["pid"]
        (length,) = struct.unpack(">I", _read_exact(out_r, 4))  # the port protocol's first frame
        ready = etf.decode(_read_exact(out_r, length))
        assert ready[0] == "ready" and ready[1] == worker_pid
        os.close(stdin_w)  # the worker's host is gone: it exits cleanly
        exited, _ = recv(conn)
        assert exited is not None and exited["op"] == "exit" and exited["pid"] == worker_pid
        assert os.waitstatus_to_exitcode(exited["status"]) == 0
        os.close(out_r)
        os.close(err_r)
        template.stdin.close()  # and the template's host: it ends and removes its directory
        assert template.wait(30) == 0
        assert not os.path.exists(listen_dir)
    finally:
        conn.close()
        if template.poll() is None:
            template.kill()
            template.wait()
        if worker_pid is not None:
            wait_until(lambda: pid_gone(worker_pid))


def test_the_template_process_and_its_handle_are_separate_modules() -> None:
    """The process side imports no host handle or pool (it runs no host threads); the handle does not
    import the process side."""
    code = textwrap.dedent("""
        import sys
        import sidecar.host.template_process
        print(sorted(m for m in ("sidecar.host.template", "sidecar.host.pool") if m in sys.modules))
    """)
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    code = "import sys, sidecar.host.template; print('sidecar.host.template_process' in sys.modules)"
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
