"""Output leases (DESIGN memory rule 7): a result the host still holds is never overwritten.

Only the host's explicit release returns a lease's memory for reuse; a lease the worker reclaims (TTL,
cap, its client's process gone, shutdown) has its segment unlinked and never reused. Real arenas,
real worker processes, real client processes that die.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import psutil
import pytest

from sidecar.cli import main as cli_main
from sidecar.dataplane.arena import Arena
from sidecar.dataplane.reaper import reap_run
from sidecar.errors import InvalidArgument
from sidecar.host import Client, Pool
from sidecar.worker.leases import LeaseOwner, LeaseTable
from tests.dataplane_ops_module import mapped_file as mapped_file_at
from tests.workers import ROOT, pid_gone, run_id, session_run, shm_of_run, start_worker, wait_until

N = 25_600  # float32: 100 KiB, above the inline threshold


def segment_exists(name: str) -> bool:
    return os.path.exists("/dev/shm/" + name.lstrip("/"))


def mapped_file(arr: np.ndarray) -> str:
    """The /dev/shm file this process maps at `arr`'s first byte."""
    return mapped_file_at(arr.__array_interface__["data"][0])


def worker_leases(client: Client) -> int:
    """Leases the worker holds, from its own memory sample (telemetry)."""
    with client.watch_telemetry(memory_interval_s=0.05, batch_window_ms=0) as watch:
        for event in watch:
            if event["type"] == "memory":
                return int(event["leases"])
    raise AssertionError("no memory sample")


# ---------------------------------------------------------------------------------------------------
# the table, with real arena blocks


@pytest.fixture
def lease_arena():
    a = Arena(session_run("tleases"))
    yield a
    a.close()


def test_reclaimed_leases_are_unlinked_released_ones_reused(lease_arena):
    now = [0.0]
    table = LeaseTable(ttl_s=10, max_leases=3, clock=lambda: now[0])
    blocks, ids = [], []
    for i in range(5):
        now[0] = float(i)
        blocks.append(lease_arena.alloc(100_000))
        ids.append(table.add([blocks[-1]]))
    # The cap reclaimed the two oldest: unlinked, not put back for reuse.
    assert table.count == 3 and table.expired_total == 2
    assert [segment_exists(b.name) for b in blocks] == [False, False, True, True, True]
    assert lease_arena.discarded == 2 and lease_arena.stats().cached_bytes == 0
    now[0] = 12.5  # the lease made at t=2 is past its TTL
    assert table.expire() == 1 and not segment_exists(blocks[2].name) and lease_arena.discarded == 3
    # The host's own release is the one way back to the free list: the next alloc reuses it.
    assert table.release([ids[3], "l-unknown"]) == (1, ["l-unknown"])
    assert segment_exists(blocks[3].name) and lease_arena.stats().cached_bytes > 0
    again = lease_arena.alloc(100_000)
    assert again.name == blocks[3].name
    again.release()
    table.close()  # the worker stops: the last lease is reclaimed too
    assert table.count == 0 and not segment_exists(blocks[4].name) and lease_arena.discarded == 4


def test_ttl_and_cap_must_be_positive():
    for bad in ({"ttl_s": 0}, {"ttl_s": -1}, {"ttl_s": float("nan")}, {"max_leases": 0}):
        with pytest.raises(ValueError):
            LeaseTable(**bad)


def test_leases_of_a_dead_client_process_are_unlinked(lease_arena):
    table = LeaseTable(ttl_s=300)
    client = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        block = lease_arena.alloc(100_000)
        table.add([block], LeaseOwner(client.pid, "c1"))
        assert table.drop_dead_owners() == 0 and segment_exists(block.name)  # alive: kept
    finally:
        client.kill()
        client.wait()
    assert table.drop_dead_owners() == 1 and table.orphaned_total == 1
    assert not segment_exists(block.name) and table.count == 0
    # Clients that hold no lease are not remembered (a host making a Client per request does not grow it).
    table.release([table.add([lease_arena.alloc(100_000)], LeaseOwner(os.getpid(), f"c{i}")) for i in range(50)])
    table.drop_dead_owners()
    assert table.watched_clients == 0


def test_an_owner_this_worker_cannot_see_is_never_judged_dead(lease_arena):
    # A pid from another pid namespace (or one that is gone before its first call is seen) cannot be
    # watched: its leases end by release, TTL or cap, never by a liveness guess.
    pid = next(p for p in range(4_000_000, 1, -1) if not psutil.pid_exists(p))
    table = LeaseTable(ttl_s=300)
    block = lease_arena.alloc(100_000)
    lease = table.add([block], LeaseOwner(pid, "far"))
    assert table.drop_dead_owners() == 0 and lease in table
    table.close()


# ---------------------------------------------------------------------------------------------------
# end to end: a host that keeps its results


def test_a_kept_result_outlives_its_lease_ttl():
    """The issue's repro: keep y past a 0.5 s --lease-ttl, make 20 more calls: y is unchanged."""
    run = run_id()
    with start_worker("--device", "cpu", "--threads", "1", "--run-id", run, "--lease-ttl", "0.5") as w:
        with Client(w.address) as c:
            x = np.arange(N, dtype=np.float32)
            y = c.call("add", x, 1.0)
            path = mapped_file(y)
            assert path.startswith(f"/dev/shm/sc-{run}-") and worker_leases(c) == 1
            wait_until(lambda: worker_leases(c) == 0)  # reclaimed by the TTL, no call needed
            assert not os.path.exists(path)  # ... by unlinking its segment
            for i in range(20):
                z = c.call("add", np.full(N, 1000.0 + i, np.float32), 1.0)
                assert z[0] == 1001.0 + i
                del z  # its lease is released with the next call: that memory *is* reused
            np.testing.assert_array_equal(y, x + 1.0)
        assert w.alive()


def test_results_beyond_max_leases_stay_valid_through_a_pool():
    """Pool(max_leases=2, lease_ttl_s=...) reaches the workers: beyond two held results the oldest
    lease is reclaimed by unlinking, and every result the host still holds keeps its values."""
    run = run_id()
    with pytest.raises(InvalidArgument):
        Pool(1, device="cpu", run_id=run, lease_ttl_s=0)
    with Pool(1, device="cpu", run_id=run, max_leases=2, lease_ttl_s=3600, threads=1) as pool:
        kept = [pool.call("add", np.full(N, float(i), np.float32), 1.0) for i in range(5)]
        paths = [mapped_file(k) for k in kept]
        assert [os.path.exists(p) for p in paths] == [False, False, False, True, True]
        for i in range(20):
            z = pool.call("mul", np.full(N, 7.0, np.float32), float(i))
            del z
        for i, k in enumerate(kept):
            np.testing.assert_array_equal(k, np.full(N, i + 1.0, np.float32))


CLIENT_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    from sidecar.host import Client
    c = Client(sys.argv[1], run_id=sys.argv[2])
    y = c.call("add", np.zeros(25_600, np.float32), 1.0)  # kept: its lease stays held
    addr = y.__array_interface__["data"][0]
    for line in open("/proc/self/maps"):
        lo, hi = (int(v, 16) for v in line.split()[0].split("-"))
        if lo <= addr < hi:
            print(line.split()[5], flush=True)
    sys.stdin.read()  # until killed
""")


def test_leases_of_a_killed_client_are_reclaimed_long_before_the_ttl():
    run, client_run = run_id(), run_id()
    with start_worker("--device", "cpu", "--threads", "1", "--run-id", run) as w:  # default TTL: 300 s
        proc = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, w.address, client_run], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            path = proc.stdout.readline().strip()
            assert path.startswith(f"/dev/shm/sc-{run}-{w.pid}-"), path
            assert os.path.exists(path)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            reap_run(client_run)  # the killed client's own arena (a pool's reaper does this for workers)
        wait_until(lambda: not os.path.exists(path))  # the janitor saw the owner die
        with Client(w.address) as c:
            assert worker_leases(c) == 0 and c.call("add", np.ones(4, np.float32), 1.0)[0] == 2.0
        assert w.alive()
    assert pid_gone(w.pid)


def test_cli_refuses_lease_ttl_zero_negative_and_bad_caps(capsys):
    for args in (["--lease-ttl", "0"], ["--lease-ttl", "-5"], ["--lease-ttl", "nan"], ["--max-leases", "0"]):
        assert cli_main(["serve", *args]) == 2
        err = capsys.readouterr().err
        assert "must be" in err and "> 0" in err, err


def test_port_leases_end_with_the_vm_stdin_eof():
    """On the port transport the client is the VM: an unreleased lease is reclaimed (unlinked) when
    stdin closes, and the worker leaves none of its segments behind."""
    from sidecar.etf import Atom as A
    from tests.test_stdio_transport import PortClient, inline

    port = PortClient()
    tag, _, result = port.request((A("call"), 1, "add", [inline(np.zeros(N, np.float32)), 1.0], {}))
    assert tag == "ok" and len(result[A("leases")]) == 1, result
    name = result[A("outputs")][0][1][A("shm")][A("name")].decode()
    assert segment_exists(name)
    assert port.close() == 0
    assert not segment_exists(name) and not shm_of_run(port.run_id)
