"""A full /dev/shm is a clean OutOfMemory at allocation (naming the segment and the bytes), never a
SIGBUS later, and leaves no half-made segment. Shown twice: against the real /dev/shm with a size
that cannot be reserved, and against a real 1 MiB tmpfs mounted over /dev/shm in a private mount
namespace (`unshare -m`, needs root)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from sidecar.dataplane import reaper
from sidecar.dataplane.segments import create_segment, shm_usage
from sidecar.errors import OutOfMemory
from tests.workers import session_run

RUN = session_run("tfull")


def test_size_beyond_free_space_is_out_of_memory():
    free, total = shm_usage()
    want = free + (1 << 30)
    with pytest.raises(OutOfMemory) as ei:
        create_segment(want, RUN)
    e = ei.value
    assert (e.device, e.requested_bytes, e.total_bytes) == ("shm", want, total)
    assert 0 <= e.free_bytes <= total
    assert f"{want} bytes" in e.message and f"/sc-{RUN}-" in e.message
    assert reaper.list_segments(RUN) == []  # the half-made segment was unlinked


SMALL_TMPFS = """
    import json, os
    from sidecar.dataplane.arena import Arena
    from sidecar.dataplane.segments import create_segment
    from sidecar.errors import OutOfMemory
    KiB = 1024
    out = {}
    first = create_segment(600 * KiB, "tfull")
    try:
        create_segment(600 * KiB, "tfull")
    except OutOfMemory as e:
        out["error"] = e.to_dict()
    out["left"] = sorted(os.listdir("/dev/shm"))
    out["first"] = first.name.lstrip("/")
    first.close()  # unlinked but still mapped memory would still count against the tmpfs
    os.unlink("/dev/shm/" + out["first"])
    # An arena holding warm memory gives it back and retries before failing.
    with Arena("tfull") as arena:
        arena.alloc(512 * KiB).release()
        b = arena.alloc(768 * KiB)
        out["arena_after_retry"] = [arena.stats().cached_bytes, b.capacity]
    print(json.dumps(out))
"""


def test_small_tmpfs_fills_cleanly():
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("mounting a private tmpfs needs root and unshare(1); covered above by the size test")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m not permitted here: {probe.stderr.decode().strip()}")
    script = textwrap.dedent(SMALL_TMPFS)
    cmd = ["unshare", "-m", "sh", "-c",
           'mount --make-rprivate / && mount -t tmpfs -o size=1m,mode=1777 tmpfs /dev/shm && exec "$0" -c "$1"',
           sys.executable, script]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    err = res["error"]
    assert err["kind"] == "OUT_OF_MEMORY" and err["device"] == "shm"
    assert err["requested_bytes"] == 600 * 1024 and err["total_bytes"] == 1 << 20
    assert err["free_bytes"] < 600 * 1024
    assert "600 bytes" not in err["message"] and "614400 bytes" in err["message"] and "/sc-tfull-" in err["message"]
    assert res["left"] == [res["first"]]  # no half-made second segment
    assert res["arena_after_retry"] == [0, 768 * 1024]
