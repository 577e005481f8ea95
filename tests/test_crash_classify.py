"""Exit classification on the real exit statuses of real child processes."""
from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys

import pytest

from sidecar.host.crash import (Classification, ExitInfo, classify_from_tail, classify_returncode,
                                classify_wait_status, condense_tail, oom_kill_count, summarize_tail, unknown_exit)

# Each snippet ends its interpreter the way a broken worker would.
CASES = [
    ("pass", Classification.CLEAN, 0, None),
    ("raise RuntimeError('boom')", Classification.PYTHON_ERROR, 1, None),
    ("import ctypes; ctypes.memset(0, 1, 1)", Classification.SEGFAULT, None, signal.SIGSEGV),
    ("import os; os.abort()", Classification.ABORT, None, signal.SIGABRT),
    ("import signal; signal.raise_signal(signal.SIGFPE)", Classification.FPE, None, signal.SIGFPE),
    ("import signal; signal.raise_signal(signal.SIGBUS)", Classification.BUS_ERROR, None, signal.SIGBUS),
    ("import signal; signal.raise_signal(signal.SIGILL)", Classification.ILLEGAL_INSTRUCTION, None, signal.SIGILL),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", Classification.KILLED, None, signal.SIGKILL),
    ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", Classification.TERMINATED, None, signal.SIGTERM),
    ("import os; os._exit(70)", Classification.TAINTED, 70, None),
    ("import os; os._exit(3)", Classification.OTHER, 3, None),
    ("import signal; signal.raise_signal(signal.SIGUSR1)", Classification.OTHER, None, signal.SIGUSR1),
]


def _run(code: str) -> int:
    return subprocess.run([sys.executable, "-c", code], stderr=subprocess.DEVNULL, timeout=30).returncode


@pytest.mark.parametrize("code,expected,exit_code,signum", CASES, ids=[c[1].value + "-" + c[0][:20] for c in CASES])
def test_popen_returncode(code: str, expected: Classification, exit_code: int | None, signum: int | None) -> None:
    info = classify_returncode(_run(code))
    assert info.classification is expected
    assert info.exit_code == exit_code
    assert info.signal == signum
    assert info.crashed == (expected is not Classification.CLEAN)
    fields = info.as_fields()
    assert fields["classification"] == expected.value
    assert fields.get("signal") == signum


@pytest.mark.parametrize("code,expected,signum", [
    ("import ctypes; ctypes.memset(0, 1, 1)", Classification.SEGFAULT, signal.SIGSEGV),
    ("import os; os.abort()", Classification.ABORT, signal.SIGABRT),
    ("import os; os._exit(70)", Classification.TAINTED, None),
])
def test_raw_wait_status_of_forked_child(code: str, expected: Classification, signum: int | None) -> None:
    """The template path reports raw waitpid statuses; they classify the same way."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            faulthandler.disable()  # pytest's handler would print the crash of this child
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            exec(code)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    info = classify_wait_status(status)
    assert info.classification is expected
    assert info.signal == signum


@pytest.mark.parametrize("code,expected,signum", [
    ("import ctypes; ctypes.memset(0, 1, 1)", Classification.SEGFAULT, signal.SIGSEGV),
    ("import os; os.abort()", Classification.ABORT, signal.SIGABRT),
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", Classification.KILLED, signal.SIGKILL),
])
def test_shell_in_between_reports_128_plus_signal(code: str, expected: Classification, signum: int) -> None:
    """`sh -c 'python ...; exit $?'` turns a signal death into exit code 128+N; still classified."""
    rc = subprocess.run(["sh", "-c", f'"{sys.executable}" -c "{code}" 2>/dev/null; exit $?'], timeout=30).returncode
    assert rc == 128 + signum
    info = classify_returncode(rc)
    assert info.classification is expected
    assert info.signal == signum and info.exit_code == rc


def test_describe_and_returncode() -> None:
    seg = classify_returncode(-signal.SIGSEGV)
    assert "segmentation fault" in seg.describe() and "SIGSEGV" in seg.describe()
    assert seg.returncode == -signal.SIGSEGV and seg.signal_name == "SIGSEGV"
    killed = classify_returncode(-signal.SIGKILL)
    assert killed.classification is Classification.KILLED
    assert "SIGKILL" in killed.describe() and "memory" not in killed.describe()  # no OOM claimed unconfirmed
    assert killed.with_oom(False) is killed
    oom = killed.with_oom(True)  # the cgroup's oom_kill counter moved: only then it is an OOM kill
    assert oom.classification is Classification.KILLED_OOM and oom.oom_confirmed
    assert "OOM killer" in oom.describe() and oom.signal == signal.SIGKILL
    assert not classify_returncode(-signal.SIGSEGV).with_oom(True).oom_confirmed  # only SIGKILL
    assert "exit code 3" in classify_returncode(3).describe()
    assert unknown_exit().classification is Classification.UNKNOWN
    assert ExitInfo(Classification.CLEAN, 0).returncode == 0


def test_oom_counter_reads_an_int_or_none() -> None:
    n = oom_kill_count()
    assert n is None or (isinstance(n, int) and n >= 0)


FAULTHANDLER_DUMP = [
    "INFO serving", "Fatal Python error: Segmentation fault", "",
    "Thread 0x00007e (most recent call first):",
    '  File "/x/threading.py", line 331 in wait', '  File "/x/threading.py", line 1002 in _bootstrap',
    "Current thread 0x00007f (most recent call first):",
    '  File "/x/debug_ops.py", line 49 in segfault', '  File "/x/dispatcher.py", line 10 in run',
    "Thread 0x00007d (most recent call first):",
    *[f'  File "/x/t.py", line {i} in f' for i in range(100)],
    "", "Extension modules: numpy, torch (total: 2)"]


def test_summarize_tail_points_at_the_crash_site() -> None:
    assert summarize_tail(FAULTHANDLER_DUMP) == ('Fatal Python error: Segmentation fault '
                                                 '(File "/x/debug_ops.py", line 49 in segfault)')
    assert summarize_tail(["Traceback (most recent call last):", "ValueError: bad"]) == "ValueError: bad"
    assert summarize_tail([]) is None


def test_condense_tail_keeps_the_crashing_thread() -> None:
    short = condense_tail(FAULTHANDLER_DUMP, 6)
    assert short == ["INFO serving", "Fatal Python error: Segmentation fault",
                     "Current thread 0x00007f (most recent call first):",
                     '  File "/x/debug_ops.py", line 49 in segfault', '  File "/x/dispatcher.py", line 10 in run']
    assert condense_tail(FAULTHANDLER_DUMP, 2) == FAULTHANDLER_DUMP[1:2] + FAULTHANDLER_DUMP[6:7]
    plain = [f"line {i}" for i in range(50)]
    assert condense_tail(plain, 3) == ["line 47", "line 48", "line 49"]


def test_blames_work_tells_crashes_of_the_work_from_kills_from_outside() -> None:
    for rc in (-signal.SIGSEGV, -signal.SIGABRT, -signal.SIGFPE, -signal.SIGBUS, -signal.SIGILL, 1, 3, 70, 139):
        assert classify_returncode(rc).blames_work, rc
    for rc in (0, -signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, 137):
        assert not classify_returncode(rc).blames_work, rc
    assert classify_returncode(-signal.SIGKILL).with_oom(True).blames_work  # a counted OOM kill: the work's
    for cls in (Classification.UNRESPONSIVE, Classification.STUCK, Classification.START_TIMEOUT,
                Classification.UNKNOWN):
        assert not ExitInfo(cls).blames_work, cls


def test_classify_from_tail_reads_faulthandler_when_the_status_is_lost() -> None:
    assert classify_from_tail(FAULTHANDLER_DUMP).classification is Classification.SEGFAULT
    assert classify_from_tail(FAULTHANDLER_DUMP).signal == signal.SIGSEGV
    assert classify_from_tail(["x", "Fatal Python error: Aborted", ""]).classification is Classification.ABORT
    assert classify_from_tail(["INFO serving on unix:/x"]).classification is Classification.UNKNOWN
    assert classify_from_tail([]).classification is Classification.UNKNOWN
