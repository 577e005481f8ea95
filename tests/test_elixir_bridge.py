"""The Elixir bridge's ExUnit suite (bridge/test), run as part of the project's tests, and what a
real VM leaves behind when it ends without stopping its pool (`mix run` scripts).

It starts real sidecar workers with this interpreter (SIDECAR_PYTHON) from a real BEAM. Elixir is a
required tool of this project (scripts/install.sh installs Debian's `elixir`): when it is missing
this test fails and says so, it does not skip.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.workers import pid_gone, shm_of_run, wait_until

BRIDGE = Path(__file__).resolve().parent.parent / "bridge"
TIMEOUT_S = 300


@pytest.mark.timeout(TIMEOUT_S + 30)  # the suite's own limit is TIMEOUT_S, not pytest's default 120 s
def test_exunit_suite_passes() -> None:
    mix = shutil.which("mix")
    assert mix is not None, (
        "Elixir is not installed (no `mix` on PATH): the Elixir bridge cannot be tested. "
        "Install it with `apt-get install -y elixir` (scripts/install.sh does this).")
    env = {**os.environ, "MIX_ENV": "test", "HEX_OFFLINE": "1", "SIDECAR_PYTHON": sys.executable}
    run = subprocess.run([mix, "test"], cwd=BRIDGE, env=env, capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    out = run.stdout + run.stderr
    assert run.returncode == 0, f"mix test failed (exit {run.returncode}):\n{out[-8000:]}"
    m = re.search(r"(\d+) tests?, 0 failures", out)
    assert m and int(m.group(1)) >= 30, f"expected the full ExUnit suite to run:\n{out[-3000:]}"
    assert "no segment of run" in out  # the suite's own /dev/shm check ran


# -- what a VM leaves behind when it ends ----------------------------------------------------------

# A pool with one worker; a segment of the VM and a worker output segment held (read: false); then
# the ending named by the first argument. Prints the run id, the pids and the worker's log.
SCRIPT = r'''
{:ok, _} = Sidecar.start_link(name: :script_pool, workers: 1)
:ok = Sidecar.await_ready(:script_pool)
t = Sidecar.Tensor.from_binary!(:binary.copy(<<1>>, 1_000_000), "uint8", [1_000_000])
{:ok, _held} = Sidecar.call(:script_pool, "identity", [t], read: false)
[w] = Sidecar.status(:script_pool)
mode = Integer.to_string(Bitwise.band(File.stat!(w.stderr_log).mode, 0o777), 8)
IO.puts("SCRIPT #{Sidecar.Shm.run_id()} #{System.pid()} #{w.os_pid} #{w.stderr_log} #{mode}")

case System.argv() do
  ["end"] -> :ok
  ["raise"] -> raise "the script fails"
  ["stop"] -> System.stop(0) && Process.sleep(:infinity)
  ["hang"] -> Process.sleep(:infinity)
end
'''


@dataclass(frozen=True)
class ScriptVM:
    run: str
    vm_pid: int
    worker_pid: int
    log: Path
    log_mode: str


def _script_vm(line: str) -> ScriptVM:
    tag, run, vm, worker, log, mode = line.split()
    assert tag == "SCRIPT", line
    return ScriptVM(run, int(vm), int(worker), Path(log), mode)


def _mix_run(tmp_path: Path, ending: str, **popen: Any) -> subprocess.Popen[str]:
    """`mix run script.exs ENDING` in a VM whose umask is 022 and whose temporary directory (where
    its workers' logs go) is tmp_path."""
    mix = shutil.which("mix")
    assert mix is not None, "Elixir is not installed (no `mix` on PATH)"
    script = tmp_path / "script.exs"
    script.write_text(SCRIPT)
    return subprocess.Popen([mix, "run", str(script), ending], cwd=BRIDGE, env=_mix_env(tmp_path), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: os.umask(0o022), **popen)


def _mix_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "MIX_ENV": "test", "HEX_OFFLINE": "1", "SIDECAR_PYTHON": sys.executable,
            "TMPDIR": str(tmp_path), **extra}


def _finish(proc: subprocess.Popen[str]) -> tuple[ScriptVM, str]:
    out, err = proc.communicate(timeout=TIMEOUT_S)
    lines = [ln for ln in out.splitlines() if ln.startswith("SCRIPT ")]
    assert lines, f"the script did not get its pool going (exit {proc.returncode}):\n{out}\n{err[-4000:]}"
    return _script_vm(lines[0]), out + err


@pytest.mark.parametrize("ending", ["end", "raise", "stop"])
def test_a_vm_that_ends_without_stopping_its_pool_leaves_nothing(ending: str, tmp_path: Path) -> None:
    # end: the CLI halts after the script; raise: an uncaught exception, then halt; stop: System.stop
    # (the CLI may see the script's process shut down and halt with 1 meanwhile: either status).
    proc = _mix_run(tmp_path, ending)
    vm, out = _finish(proc)
    expected = {"end": {0}, "raise": {1}, "stop": {0, 1}}[ending]
    assert proc.returncode in expected, out[-4000:]
    assert vm.log_mode == "600", "the worker's log must be private from its creation"
    assert shm_of_run(vm.run) == set(), out[-4000:]
    assert not vm.log.exists()
    assert list(tmp_path.glob("sidecar-bridge-*")) == []
    assert pid_gone(vm.worker_pid)


def test_a_vm_killed_with_sigkill_leaves_files_that_the_next_pool_removes(tmp_path: Path) -> None:
    proc = _mix_run(tmp_path, "hang")
    assert proc.stdout is not None
    line = proc.stdout.readline()
    while line and not line.startswith("SCRIPT "):
        line = proc.stdout.readline()
    assert line, f"the script did not get its pool going:\n{proc.communicate(timeout=60)}"
    vm = _script_vm(line)
    # Stopped first, the VM cannot react to its worker's death; then both die with SIGKILL.
    os.kill(vm.vm_pid, signal.SIGSTOP)
    os.kill(vm.worker_pid, signal.SIGKILL)
    wait_until(lambda: pid_gone(vm.worker_pid))
    os.kill(vm.vm_pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    # The pool's template sees its host go (stdin EOF): it kills its workers and unlinks the
    # segments of the run's dead owners (the worker's held output). What is left (the worker's log,
    # the VM's own segment if the VM was not quite gone when the template looked) is for the next pool.
    wait_until(lambda: not any(f"-{vm.worker_pid}-" in name for name in shm_of_run(vm.run)))
    assert vm.log.exists()

    # The next pool (another VM, another run) sweeps the dead owners' files at its start.
    nxt = _mix_run(tmp_path, "end")
    nxt_vm, out = _finish(nxt)
    assert nxt.returncode == 0, out[-4000:]
    assert nxt_vm.run != vm.run
    assert shm_of_run(vm.run) == set()
    assert not vm.log.exists()


# -- the NIF and its fallback ---------------------------------------------------------------------

# A 4 MB round trip from a fresh segment and one from an alloc/write segment; prints what served it.
PATH_SCRIPT = r'''
alias Sidecar.Tensor
{:ok, _} = Sidecar.start_link(name: :path_pool, workers: 1)
:ok = Sidecar.await_ready(:path_pool)
bin = :binary.copy(:rand.bytes(1_000_000), 4)
{:ok, t} = Tensor.from_binary(bin, "uint8", [4_000_000])
{:shm, %{name: name}} = t.storage
mode = Integer.to_string(Bitwise.band(File.stat!(Sidecar.Shm.path(name)).mode, 0o777), 8)
{:ok, %{outputs: [out]}} = Sidecar.call(:path_pool, "identity", [t])
{:data, back} = out.storage
{:ok, a} = Tensor.alloc("uint8", [4_000_000])
:ok = Tensor.write(a, 0, bin)
{:ok, %{outputs: [out2]}} = Sidecar.call(:path_pool, "identity", [a])
[w] = Sidecar.status(:path_pool)
zero_copy = Sidecar.Native.loaded?() and Sidecar.Native.locate(back) != :not_found
IO.puts("NATIVE #{inspect(Sidecar.Native.status())}")
IO.puts("RESULT #{back == bin} #{Tensor.to_binary!(out2) == bin} #{mode} #{zero_copy} #{w.via}")
IO.puts("VM #{Sidecar.Shm.run_id()} #{System.pid()}")
'''


def _run_path_script(tmp_path: Path, cwd: Path, prefix: list[str] | None = None,
                     **env: str) -> tuple[dict[str, str], str]:
    mix = shutil.which("mix")
    assert mix is not None, "Elixir is not installed (no `mix` on PATH)"
    script = tmp_path / "path_script.exs"
    script.write_text(PATH_SCRIPT)
    run = subprocess.run([*(prefix or []), mix, "run", str(script)], cwd=cwd, env=_mix_env(tmp_path, **env),
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-4000:]
    lines = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in run.stdout.splitlines()
             if ln.split(" ", 1)[0] in ("NATIVE", "RESULT", "VM")}
    assert set(lines) == {"NATIVE", "RESULT", "VM"}, out[-4000:]
    return lines, out


def test_with_the_nif_results_are_zero_copy_and_workers_forked(tmp_path: Path) -> None:
    lines, out = _run_path_script(tmp_path, BRIDGE)
    assert lines["NATIVE"] == ":loaded", out[-3000:]
    assert lines["RESULT"] == "true true 600 true fork", out[-3000:]


def test_the_pure_elixir_path_works_when_the_nif_is_disabled(tmp_path: Path) -> None:
    lines, out = _run_path_script(tmp_path, BRIDGE, SIDECAR_NIF="0")
    assert lines["NATIVE"].startswith('{:disabled, "SIDECAR_NIF=0'), out[-3000:]
    # Byte-exact both ways through file I/O, still 0600, results copied (no mapping to locate).
    assert lines["RESULT"] == "true true 600 false fork", out[-3000:]


def test_without_a_c_compiler_the_bridge_builds_says_so_and_runs_on_its_file_path(tmp_path: Path) -> None:
    # A copy of the bridge with its own _build, compiled where $CC does not exist: no NIF, no
    # launcher; the file I/O path and cold worker starts serve instead.
    copy = tmp_path / "bridge"
    copy.mkdir()
    for part in ("mix.exs", "lib", "c_src"):
        src = BRIDGE / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, copy / part)
    mix = shutil.which("mix")
    assert mix is not None
    build = subprocess.run([mix, "compile"], cwd=copy, env=_mix_env(tmp_path, CC="/no/such/cc"),
                           capture_output=True, text=True, timeout=TIMEOUT_S)
    assert build.returncode == 0, build.stdout + build.stderr
    assert "no C compiler" in build.stdout and "file I/O path" in build.stdout, build.stdout
    assert list((copy / "_build").rglob("sidecar_nif.so")) == []
    lines, out = _run_path_script(tmp_path, copy, CC="/no/such/cc")
    assert lines["NATIVE"].startswith("{:unavailable,") and "was not built" in lines["NATIVE"], out[-3000:]
    assert lines["RESULT"] == "true true 600 false cold", out[-3000:]


@pytest.mark.parametrize("nif", ["1", "0"])
def test_segments_are_created_0600_never_chmodded(nif: str, tmp_path: Path) -> None:
    """The VM's segments have mode 0600 from the system call that creates them: the NIF's shm_open
    passes 0600 with O_EXCL; the file path creates them from a shell whose umask is 077. Nothing
    changes their mode afterwards (a chmod leaves a window in which another user can open them)."""
    strace = shutil.which("strace")
    assert strace is not None, "strace is needed to watch the system calls (apt-get install -y strace)"
    log = tmp_path / "strace.log"
    # --seccomp-bpf: only the traced calls stop the tracee (the worker's torch import makes a great many
    # of others; fully ptraced, this test took 35 s instead of 4).
    watch = [strace, "-f", "--seccomp-bpf", "-qq", "-e", "trace=openat,umask,chmod,fchmodat", "-o", str(log)]
    lines, out = _run_path_script(tmp_path, BRIDGE, watch, SIDECAR_NIF=nif)
    run, vm_pid = lines["VM"].split()
    ours = f"/dev/shm/sc-{run}-{vm_pid}-"
    calls = [ln for ln in log.read_text().splitlines() if ours in ln]
    # The first open of each segment is the one that creates it (the file path opens it again, to
    # write, once the shell has made it).
    first: dict[str, str] = {}
    for ln in calls:
        if "openat(" in ln:
            first.setdefault(ln.split('"')[1], ln)
    creates = list(first.values())
    assert len(creates) >= 2, calls  # the from_binary segment and the alloc one
    assert all("O_CREAT" in ln for ln in creates), creates
    assert all("O_EXCL" in ln for ln in creates), creates
    assert not [ln for ln in calls if "chmod" in ln], calls
    if nif == "1":
        assert all(ln.rstrip().split(", ")[-1].startswith("0600)") for ln in creates), creates
    else:
        text = log.read_text().splitlines()
        for ln in creates:
            pid = ln.split()[0]
            umasks = [u for u in text[:text.index(ln)] if u.startswith(pid + " ") and "umask(" in u]
            assert umasks and "umask(077)" in umasks[-1], (ln, umasks)


def test_the_benchmark_runs_every_mode_and_a_forked_replacement() -> None:
    # A short run of benchmarks/bench_elixir.py (its numbers are for the guide, not asserted here).
    bench = BRIDGE.parent / "benchmarks" / "bench_elixir.py"
    run = subprocess.run([sys.executable, str(bench), "--sizes", "1MB", "--repeat", "3", "--replace", "2", "--json"],
                         env={**os.environ, "MIX_ENV": "test"}, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert {r["mode"] for r in result["rows"]} == {
        "binary_copy", "nif_alloc_write_alias", "nif_alloc_write", "nif_from_binary", "nif_zero_copy_input",
        "descriptors_only", "file_path", "inline"}
    assert all(r["median_us"] > 0 and r["vs_memcpy"] > 0 for r in result["rows"])
    [fork] = result["replacement"]
    assert fork["mode"] == "fork" and fork["via"] == "fork" and fork["count"] == 2
    assert fork["template_pss_bytes"] > 0
