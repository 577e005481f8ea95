"""Exit classification: turn a worker's exit status into a name a host can act on.

DESIGN.md fixes the exit codes the pool understands: 0 clean, 1 an uncaught Python exception, 70
"tainted" (the device needs a fresh process), and signals as usual. A shell or container runtime in
between reports a signal death as exit code 128+N, so 139/134/136/137 are read as signals too.
SIGKILL is `killed`: someone (a user, an orchestrator, the kernel's OOM killer) killed the worker; it
becomes `killed_oom` only when the memory cgroup's `oom_kill` counter moved while the worker lived.

`ExitInfo.blames_work` says whether an exit is evidence that the code the worker ran crashed it (a
segfault, an abort, an exit code, a confirmed OOM kill) rather than something done to the worker from
outside (SIGKILL, SIGTERM, the pool's own kills): the poison-call guard and the breakers count only
those (see `sidecar.host.breaker`).
"""
from __future__ import annotations

import os
import signal as _signal
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

__all__ = ["Classification", "ExitInfo", "classify_returncode", "classify_wait_status", "unknown_exit",
           "classify_from_tail", "oom_kill_count", "summarize_tail", "condense_tail",
           "TAINTED_EXIT_CODE"]

TAINTED_EXIT_CODE = 70  # EX_SOFTWARE: the worker says its device state needs a fresh process
_SHELL_SIGNAL_BASE = 128


class Classification(str, Enum):
    CLEAN = "clean"                    # exit 0 (asked to stop, or drained after SIGTERM)
    PYTHON_ERROR = "python_error"      # exit 1: an uncaught Python exception
    SEGFAULT = "segfault"              # SIGSEGV: invalid memory access in native code
    ABORT = "abort"                    # SIGABRT: abort()/assert in native code, or os.abort()
    FPE = "fpe"                        # SIGFPE: arithmetic fault (integer division by zero)
    BUS_ERROR = "bus_error"            # SIGBUS: e.g. touching a truncated mapping
    ILLEGAL_INSTRUCTION = "illegal_instruction"  # SIGILL: CPU feature mismatch of a native library
    KILLED = "killed"                  # SIGKILL from outside (a user, an orchestrator, an unconfirmed OOM kill)
    KILLED_OOM = "killed_oom"          # SIGKILL while the memory cgroup counted an OOM kill
    TERMINATED = "terminated"          # SIGTERM/SIGINT/SIGHUP without draining to exit 0
    TAINTED = "tainted"                # exit 70: the worker asked to be replaced
    OTHER = "other"                    # any other exit code or signal
    START_TIMEOUT = "start_timeout"    # the pool killed it: no ready line within the start timeout
    UNRESPONSIVE = "unresponsive"      # the pool killed it: it failed its health checks
    STUCK = "stuck"                    # the pool recycled it: a cancelled call kept running past the grace period
    RESTORE_FAILED = "restore_failed"  # the pool killed it: it could not restore the pool's resources
    UNKNOWN = "unknown"                # the status could not be collected


_BY_SIGNAL: dict[int, Classification] = {
    _signal.SIGSEGV: Classification.SEGFAULT,
    _signal.SIGABRT: Classification.ABORT,
    _signal.SIGFPE: Classification.FPE,
    _signal.SIGBUS: Classification.BUS_ERROR,
    _signal.SIGILL: Classification.ILLEGAL_INSTRUCTION,
    _signal.SIGKILL: Classification.KILLED,
    _signal.SIGTERM: Classification.TERMINATED,
    _signal.SIGINT: Classification.TERMINATED,
    _signal.SIGHUP: Classification.TERMINATED,
}

_DESCRIBE: dict[Classification, str] = {
    Classification.CLEAN: "exited cleanly",
    Classification.PYTHON_ERROR: "exited with an uncaught Python exception",
    Classification.SEGFAULT: "crashed with a segmentation fault (invalid memory access in native code)",
    Classification.ABORT: "aborted (abort() or a failed assertion in native code)",
    Classification.FPE: "crashed with a floating-point/arithmetic exception",
    Classification.BUS_ERROR: "crashed with a bus error (a mapping was truncated or misaligned)",
    Classification.ILLEGAL_INSTRUCTION: "executed an illegal instruction (CPU feature mismatch?)",
    Classification.KILLED: "was killed by SIGKILL from outside the pool (no OOM kill was counted)",
    Classification.KILLED_OOM: "was killed by the kernel's OOM killer (SIGKILL; the cgroup counted an oom_kill)",
    Classification.TERMINATED: "was terminated by a signal",
    Classification.TAINTED: "exited 70: its device state is tainted and needs a fresh process",
    Classification.OTHER: "exited abnormally",
    Classification.START_TIMEOUT: "was killed by the pool: it did not report ready in time",
    Classification.UNRESPONSIVE: "was killed by the pool: it stopped answering health checks",
    Classification.STUCK: "was recycled by the pool: a cancelled call was still running past the grace period",
    Classification.RESTORE_FAILED: "was killed by the pool: it could not restore the pool's resources",
    Classification.UNKNOWN: "is gone; its exit status could not be collected",
}


def _signal_name(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass(frozen=True)
class ExitInfo:
    """How a worker ended. `exit_code` is set for a normal exit, `signal` for a signal death."""

    classification: Classification
    exit_code: int | None = None
    signal: int | None = None
    oom_confirmed: bool = False  # the cgroup counted an OOM kill while the worker lived

    @property
    def signal_name(self) -> str | None:
        return None if self.signal is None else _signal_name(self.signal)

    @property
    def crashed(self) -> bool:
        """Anything but a clean exit is a crash for the pool (it restarts and counts it)."""
        return self.classification is not Classification.CLEAN

    @property
    def returncode(self) -> int | None:
        """Popen's convention: the exit code, or -N for signal N."""
        if self.signal is not None:
            return -self.signal
        return self.exit_code

    @property
    def blames_work(self) -> bool:
        """The exit is evidence that what the worker ran crashed it (not a kill from outside)."""
        return self.classification in _WORK_CAUSED

    def describe(self) -> str:
        text = _DESCRIBE[self.classification]
        if self.signal is not None and self.classification not in (Classification.KILLED, Classification.KILLED_OOM):
            text += f" ({self.signal_name})"
        elif self.classification in (Classification.OTHER, Classification.PYTHON_ERROR):
            text += f" (exit code {self.exit_code})"
        return text

    def as_fields(self) -> dict[str, object]:
        """The WORKER_CRASHED fields of sidecar.v1.Error (exit_code, signal, classification)."""
        fields: dict[str, object] = {"classification": self.classification.value}
        if self.exit_code is not None:
            fields["exit_code"] = self.exit_code
        if self.signal is not None:
            fields["signal"] = self.signal
        return fields

    def with_oom(self, confirmed: bool) -> ExitInfo:
        """A SIGKILL the cgroup counted as an OOM kill becomes `killed_oom`; anything else is unchanged."""
        if not confirmed or self.classification is not Classification.KILLED:
            return self
        return ExitInfo(Classification.KILLED_OOM, self.exit_code, self.signal, oom_confirmed=True)


# Exits that the code running in the worker caused. Not: SIGKILL/SIGTERM from outside, the pool's
# own kills (start_timeout is a start-up failure, counted as such), a lost status.
_WORK_CAUSED = frozenset({
    Classification.PYTHON_ERROR, Classification.SEGFAULT, Classification.ABORT, Classification.FPE,
    Classification.BUS_ERROR, Classification.ILLEGAL_INSTRUCTION, Classification.KILLED_OOM,
    Classification.TAINTED, Classification.OTHER,
})


def _by_signal(signum: int) -> ExitInfo:
    return ExitInfo(_BY_SIGNAL.get(signum, Classification.OTHER), signal=signum)


def classify_returncode(returncode: int) -> ExitInfo:
    """Classify a `subprocess.Popen.returncode` (negative = killed by that signal)."""
    if returncode < 0:
        return _by_signal(-returncode)
    if returncode == 0:
        return ExitInfo(Classification.CLEAN, exit_code=0)
    if returncode == 1:
        return ExitInfo(Classification.PYTHON_ERROR, exit_code=1)
    if returncode == TAINTED_EXIT_CODE:
        return ExitInfo(Classification.TAINTED, exit_code=returncode)
    signum = returncode - _SHELL_SIGNAL_BASE
    if 0 < signum < _signal.NSIG and signum in _BY_SIGNAL:
        # A shell in between turned "killed by signal N" into exit code 128+N.
        return ExitInfo(_BY_SIGNAL[signum], exit_code=returncode, signal=signum)
    return ExitInfo(Classification.OTHER, exit_code=returncode)


def classify_wait_status(status: int) -> ExitInfo:
    """Classify a raw `os.waitpid` status."""
    return classify_returncode(os.waitstatus_to_exitcode(status))


def unknown_exit() -> ExitInfo:
    return ExitInfo(Classification.UNKNOWN)


# faulthandler's first line for each fatal signal (what a worker prints before it dies of it).
_FATAL_LINES = {
    "Fatal Python error: Segmentation fault": _signal.SIGSEGV,
    "Fatal Python error: Aborted": _signal.SIGABRT,
    "Fatal Python error: Floating-point exception": _signal.SIGFPE,
    "Fatal Python error: Bus error": _signal.SIGBUS,
    "Fatal Python error: Illegal instruction": _signal.SIGILL,
}


def classify_from_tail(lines: list[str]) -> ExitInfo:
    """The exit of a worker whose wait status was lost (its template died and init reaped it), read
    from faulthandler's report in its last output; `unknown` when the output does not say."""
    for line in reversed(lines):
        signum = _FATAL_LINES.get(line.strip())
        if signum is not None:
            return _by_signal(signum)
    return unknown_exit()


def _fatal_block(lines: list[str]) -> tuple[int, list[str]] | None:
    """faulthandler's report in `lines`: (index of "Fatal Python error", that line + the crashing
    thread's stack). It dumps every thread; only the "Current thread" one says where it crashed."""
    fatal = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("Fatal Python error")), None)
    if fatal is None:
        return None
    block = [lines[fatal]]
    cur = next((i for i in range(fatal + 1, len(lines)) if lines[i].startswith("Current thread")), None)
    if cur is not None:
        block.append(lines[cur])
        for line in lines[cur + 1:]:
            if not line.startswith("  "):
                break
            block.append(line)
    return fatal, block


def condense_tail(lines: list[str], n: int) -> list[str]:
    """At most `n` lines of a worker's last output that explain its end.

    Normally the last `n` lines. After a native crash, faulthandler's dump of every thread would push
    everything useful out, so then: the lines before the crash, the fatal line and the crashing
    thread's stack (innermost frame first).
    """
    found = _fatal_block(lines)
    if found is None:
        return lines[-n:] if n > 0 else []
    fatal, block = found
    block = block[:n]
    room = n - len(block)
    return (lines[:fatal][-room:] if room > 0 else []) + block


def summarize_tail(tail: list[str]) -> str | None:
    """The most telling line of a dead worker's output, for an error message: the fatal error and
    the frame that crashed, else the last line (the exception line of a traceback, a log line)."""
    lines = [line.rstrip() for line in tail if line.strip()]
    found = _fatal_block(lines)
    if found is not None:
        fatal, block = found
        where = next((line.strip() for line in block[1:] if line.strip().startswith("File ")), None)
        summary = f"{block[0]} ({where})" if where else block[0]
        # The worker's own fatal-signal report comes just before faulthandler's and says more, e.g.
        # "sidecar: SIGBUS at 0x... inside segment /sc-... (mapped N bytes, file now M bytes)".
        named = next((line.strip() for line in reversed(lines[:fatal]) if line.startswith("sidecar: SIG")), None)
        return f"{named}; {summary}" if named else summary
    useful = [line for line in lines if not line.startswith("Extension modules:")]
    return useful[-1].strip() if useful else None


_CGROUP_ROOT = Path("/sys/fs/cgroup")


def _counter_files() -> list[Path]:
    """Where this process's cgroup counts OOM kills: v2 memory.events, v1 memory.oom_control."""
    files: list[Path] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return files
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        rel = rel.strip().lstrip("/")
        if controllers == "":
            files += [_CGROUP_ROOT / rel / "memory.events", _CGROUP_ROOT / "unified" / rel / "memory.events"]
        elif "memory" in controllers.split(","):
            files.append(_CGROUP_ROOT / "memory" / rel / "memory.oom_control")
    return files


def oom_kill_count() -> int | None:
    """The `oom_kill` counter of this process's memory cgroup (v1 or v2); None where unavailable."""
    for path in _counter_files():
        try:
            text = path.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
    return None
