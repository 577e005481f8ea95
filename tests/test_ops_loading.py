"""`--ops`: a module name (found on sys.path or in the current directory) or a path to a .py file,
with real `sidecar serve` processes started in a directory of their own."""
from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sidecar.host import Client
from tests.workers import READY, STARTED_PIDS, VENV_PYTHON

CONSOLE_SCRIPT = VENV_PYTHON.parent / "sidecar"  # the console script: sys.path[0] is its bin/, not the cwd

OPS_FILE = textwrap.dedent("""
    import sidecar

    @sidecar.op("mine.double")
    def double(x):
        return x * 2
""")


@pytest.fixture
def ops_dir(tmp_path: Path) -> Path:
    (tmp_path / "my_ops.py").write_text(OPS_FILE)
    return tmp_path


def serve(cwd: Path, *args: str) -> subprocess.Popen[str]:
    if not CONSOLE_SCRIPT.exists():
        pytest.fail(f"{CONSOLE_SCRIPT} is missing: run scripts/install.sh")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only what a user's shell has
    return subprocess.Popen([str(CONSOLE_SCRIPT), "serve", "--device", "cpu", "--threads", "1", *args],
                            cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def ready_address(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the ready line, or "" when the worker exits first
    if not line.startswith(READY):
        proc.wait(30)
        assert proc.stderr is not None
        raise AssertionError(f"worker exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
    STARTED_PIDS.add(int(line.split()[2]))
    return line.split()[1]


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    assert proc.wait(30) == 0
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


@pytest.mark.parametrize("spec", ["my_ops", "./my_ops.py", "{dir}/my_ops.py"],
                         ids=["module in cwd", "relative file", "absolute file"])
def test_ops_from_the_current_directory_or_a_file(ops_dir: Path, spec: str) -> None:
    proc = serve(ops_dir, "--ops", spec.format(dir=ops_dir))
    try:
        with Client(ready_address(proc), timeout=30) as client:
            np.testing.assert_array_equal(client.call("mine.double", np.arange(4.0)), np.arange(4.0) * 2)
            mine = next(o for o in client.list_ops() if o["name"] == "mine.double")
            assert mine["module"] == "my_ops"
    finally:
        stop(proc)


@pytest.mark.parametrize("spec, says", [
    ("not_a_module", "cannot import ops module 'not_a_module': No module named 'not_a_module'; searched: "),
    ("./missing.py", "ops file './missing.py' does not exist (looked for {dir}/missing.py)"),
], ids=["unknown module", "missing file"])
def test_a_module_that_cannot_be_found_says_where_it_was_looked_for(ops_dir: Path, spec: str, says: str) -> None:
    run = subprocess.run([str(CONSOLE_SCRIPT), "serve", "--device", "cpu", "--ops", spec], cwd=ops_dir,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and READY not in run.stdout
    assert says.format(dir=ops_dir) in run.stderr
    if spec == "not_a_module":
        searched = run.stderr.split("searched: ", 1)[1].split(". Give", 1)[0].split(", ")
        assert str(ops_dir) in searched and "--ops ./my_ops.py" in run.stderr


def test_a_module_whose_own_import_is_missing_is_not_reported_as_not_found(ops_dir: Path) -> None:
    (ops_dir / "needs_dep.py").write_text("import a_dependency_nobody_has\n")
    run = subprocess.run([str(CONSOLE_SCRIPT), "serve", "--device", "cpu", "--ops", "needs_dep"], cwd=ops_dir,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert "ops module 'needs_dep' failed on import: a module it imports is missing" in run.stderr
    assert "a_dependency_nobody_has" in run.stderr and "searched:" not in run.stderr

