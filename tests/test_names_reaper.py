"""Segment naming and the reaper: real segments, a real child process killed with SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from sidecar import _native
from sidecar.dataplane import names, reaper
from sidecar.dataplane.names import NAME_RE, SegmentName, make_name, parse_name, validate_run_id
from sidecar.dataplane.segments import create_segment, open_segment, segment_path
from sidecar.errors import InvalidArgument, InvalidTensorRef


@pytest.mark.parametrize("name", [
    "/sc-a-1-0123abcd",
    "/sc-" + "Z9" * 16 + "-4194304-" + "f" * 32,
])
def test_valid_names_parse(name):
    parsed = parse_name(name)
    assert parsed.name == name and NAME_RE.fullmatch(name)


@pytest.mark.parametrize("name", [
    "", "sc-a-1-0123abcd", "/sc-a-1-0123abc", "/sc-a-1-0123ABCD", "/sc-a_b-1-0123abcd", "/sc--1-0123abcd",
    "/sc-" + "a" * 33 + "-1-0123abcd", "/sc-a--1-0123abcd", "/sc-a-x-0123abcd", "/sc-a-1-" + "a" * 33,
    "/sc-a-1-0123abcd\n", "/sc-a-1-0123abcd/../../etc/passwd", "/../sc-a-1-0123abcd", "/dev/shm/sc-a-1-0123abcd",
    "/sc-a-1-0123abcd\x00", "/sc-á-1-0123abcd", "/sc-a-١-0123abcd", None, 7, b"/sc-a-1-0123abcd",
])
def test_bad_names_are_refused(name):
    with pytest.raises(InvalidTensorRef) as ei:
        parse_name(name)
    assert ei.value.field == "name"
    with pytest.raises(InvalidTensorRef):
        open_segment(name)


def test_make_name_round_trips():
    n = make_name("run1")
    p = parse_name(n)
    assert p == SegmentName("run1", os.getpid(), p.rand) and len(p.rand) == 16
    assert parse_name(make_name("r", pid=123)).pid == 123
    assert make_name("r") != make_name("r")
    for bad in ("", "a-b", "a" * 33, "ü", None):
        with pytest.raises(InvalidArgument):
            make_name(bad)
    assert validate_run_id("Ab9") == "Ab9"


def run_child(code: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=60, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_default_run_id_from_env_or_random():
    code = """
        from sidecar.dataplane.names import default_run_id
        a = default_run_id(); assert a == default_run_id(); print(a)
    """
    assert run_child(code, {"SIDECAR_RUN_ID": "myRun42"}) == "myRun42"
    rand = run_child(code, {"SIDECAR_RUN_ID": "bad-run-id"})
    assert rand != "bad-run-id" and validate_run_id(rand)
    env = {k: v for k, v in os.environ.items() if k != "SIDECAR_RUN_ID"}
    assert run_child(code, env) != run_child(code, env)
    assert names.default_run_id() == names.default_run_id()



def test_random_run_ids_carry_the_run_prefix(monkeypatch):
    monkeypatch.setenv(names.RUN_PREFIX_ENV, "abc")
    a, b = names.new_run_id(), names.new_run_id()
    assert a.startswith("abc") and b.startswith("abc") and a != b and validate_run_id(a)
    monkeypatch.setenv(names.RUN_PREFIX_ENV, "bad-prefix")  # ignored, with a warning
    assert validate_run_id(names.new_run_id())
    monkeypatch.setenv(names.RUN_PREFIX_ENV, "x" * 21)  # no room left for the random part
    assert not names.new_run_id().startswith("x" * 21)


def test_leak_guard_blames_only_this_sessions_segments():
    """On a machine shared with other test runs, a segment of another run whose owner is dead is not
    this test's leak (nor ours to unlink); one of this session's runs is, whoever owns it."""
    from tests import workers

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a dead pid this session did not start as a worker
    foreign = make_name("otherRun9", pid=child.pid)[1:]
    ours_dead = make_name(workers.run_id(), pid=child.pid)[1:]
    assert not workers._ours(foreign)
    assert workers._ours(ours_dead)
    assert workers._ours(make_name("otherRun9")[1:])  # owned by this process
    assert not workers._ours("sc-not-our-scheme")


CREATOR = """
    import sys
    from sidecar.dataplane.segments import create_segment
    segs = [create_segment(n, sys.argv[1]) for n in (1, 4096, 1 << 20)]
    print(" ".join(s.name for s in segs), flush=True)
    sys.stdin.read()  # wait until killed
"""


def test_reaper_after_kill_9_of_owner():
    run = "treap" + os.urandom(4).hex()
    mine = create_segment(100, run)  # alive owner: must survive
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(CREATOR), run], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        created = child.stdout.readline().split()
        assert len(created) == 3 and all(parse_name(n).pid == child.pid for n in created)
        assert reaper.reap_dead_owners(run) == []  # owner still alive
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        assert all(segment_path(n).exists() for n in created)  # SIGKILL leaves them behind...
        assert {s.name for s in reaper.list_segments(run)} == set(created) | {mine.name}
        assert sorted(reaper.reap_dead_owners(run)) == sorted(created)  # ...the reaper removes them
        assert not any(segment_path(n).exists() for n in created)
        assert [s.name for s in reaper.list_segments(run)] == [mine.name]
        assert reaper.reap_dead_owners(run) == []
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        child.stdin.close()
        reaper.reap_run(run)
    assert not segment_path(mine.name).exists()


def test_reap_run_and_reap_owner_touch_only_matching_names():
    run, other = "tra" + os.urandom(4).hex(), "trb" + os.urandom(4).hex()
    a1, a2 = create_segment(10, run), create_segment(10, run)
    foreign = _native.Segment.create(make_name(run, pid=999999999), 10)  # another owner pid, same run
    b = create_segment(10, other)
    odd = "/sc-" + run + "_x-1-0123abcd"  # our prefix, but not a valid name: never touched
    _native.Segment.create(odd, 10).close()
    try:
        assert reaper.reap_owner(run, 999999999) == [foreign.name]
        assert sorted(reaper.reap_run(run)) == sorted([a1.name, a2.name])
        assert reaper.list_segments(run) == []
        assert [s.name for s in reaper.list_segments(other)] == [b.name]
        assert os.path.exists(segment_path(odd))
        assert reaper.reap_dead_owners(other) == []  # b's owner (this process) is alive
        # (no sweep of all runs here: other test sessions share /dev/shm and own their segments)
    finally:
        _native.unlink(odd)
        reaper.reap_run(other)


def test_owner_alive_rules():
    me = parse_name(make_name("x"))
    assert reaper.owner_alive(me)
    assert not reaper.owner_alive(SegmentName("x", 999999999, "0123abcd"))
    assert not reaper.owner_alive(SegmentName("x", 0, "0123abcd"))
