"""The template's control protocol, shared by its two ends (`sidecar.host.template`, the host's
handle, and `sidecar.host.template_process`, the template itself).

One JSON object per SOCK_SEQPACKET record, file descriptors as ancillary data (SCM_RIGHTS):
  host -> template: {"op": "spawn", "id", "argv", "env", "cwd"} + fds [stdin, stdout, stderr];
                    {"op": "watch", "pid"}; {"op": "shutdown"}
  template -> host: {"op": "ready", "pid", "preload_s", "modules", "failed", "cuda_mapped",
                     "fork_cuda_ok", "cuda_touched", "threads"};
                    {"op": "spawned", "id", "pid"} + fds [pidfd]; {"op": "spawn_failed", "id", "error"};
                    {"op": "exit", "pid", "status"}
In launch mode (the Elixir bridge) each worker's launcher connects on its own and sends one spawn;
the ready message is then one JSON line on the template's stdout, with "listen" (the socket path).
"""
from __future__ import annotations

import json
import os
import socket
from typing import Any, Mapping, Sequence

__all__ = ["MSG_MAX", "TEMPLATE_MODULE", "send", "recv"]

MSG_MAX = 1 << 20
TEMPLATE_MODULE = "sidecar.host.template_process"  # what `python -m` runs to start a template


def send(sock: socket.socket, obj: Mapping[str, Any], fds: Sequence[int] = ()) -> None:
    """One record (with `fds` attached); a short send is a bug, not a condition."""
    data = json.dumps(obj).encode()
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
    else:
        sent = sock.send(data)
    if sent != len(data):  # a SEQPACKET record is all or nothing
        raise OSError(f"short send on the template socket ({sent} of {len(data)} bytes)")


def recv(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """The next record and the descriptors that came with it; (None, []) at EOF."""
    data, fds, _flags, _addr = socket.recv_fds(sock, MSG_MAX, 8)
    if not data:
        for fd in fds:
            os.close(fd)
        return None, []
    return json.loads(data), fds
