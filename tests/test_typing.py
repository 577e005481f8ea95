"""`@sidecar.op` keeps a user's function's signature for the type checker (mypy run on a user file in
a subprocess, as a user's CI would), both forms of it serve ops, and a stub that disagrees with a C module is caught."""
from __future__ import annotations

import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from sidecar.host import Client
from tests.workers import ROOT, start_worker

USER_FILE = textwrap.dedent("""
    import sidecar
    from sidecar.worker.registry import op


    @sidecar.op
    def scale(x: list[float], *, factor: float = 2.0) -> list[float]:
        return [v * factor for v in x]


    @sidecar.op("mine.shift", idempotent=False, attrs=["by"])
    def shift(x: list[float], by: int = 1) -> list[float]:
        return [v + by for v in x]


    @op()
    def count(x: list[float]) -> int:
        return len(x)


    @sidecar.on_startup
    def warm() -> None:
        pass


    reveal_type(scale)
    reveal_type(shift)
    reveal_type(count)
    reveal_type(warm)
    ok: list[float] = scale([1.0], factor=3.0) + shift([1.0], by=2)
    n: int = count([])
    scale("not a list")  # the wrong argument types
    shift([1.0], by="two")
""")


def line_of(text: str) -> int:
    return USER_FILE.splitlines().index(text) + 1


def run_mypy(path: Path) -> list[str]:
    # The project's own cache (scripts/test.sh has just run mypy on sidecar/ with these options):
    # what it already analysed (sidecar, numpy, torch's stubs) is not analysed again (14 s -> 3 s).
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--hide-error-context",
                          "--cache-dir", str(ROOT / ".mypy_cache"), str(path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert out.stderr == "", out.stderr
    return [line.split(":", 1)[1] for line in out.stdout.splitlines()]  # "<line>: <severity>: <text>"


def test_op_keeps_the_decorated_functions_signature(tmp_path: Path) -> None:
    user = tmp_path / "user_ops.py"
    user.write_text(USER_FILE)
    lines = run_mypy(user)
    revealed = {int(line.split(":")[0]): line.split('Revealed type is "', 1)[1].rstrip('"').replace("builtins.", "")
                for line in lines if "Revealed type" in line}
    assert revealed == {
        line_of("reveal_type(scale)"): "def (x: list[float], *, factor: float =) -> list[float]",
        line_of("reveal_type(shift)"): "def (x: list[float], by: int =) -> list[float]",
        line_of("reveal_type(count)"): "def (x: list[float]) -> int",
        line_of("reveal_type(warm)"): "def ()",
    }
    errors = [line for line in lines if " error: " in line]
    assert len(errors) == 2, lines
    wrong_list, wrong_int = line_of('scale("not a list")  # the wrong argument types'), line_of('shift([1.0], by="two")')
    assert errors[0].startswith(f"{wrong_list}: error: "
                                'Argument 1 to "scale" has incompatible type "str"; expected "list[float]"'), errors
    assert errors[1].startswith(f"{wrong_int}: error: "
                                'Argument "by" to "shift" has incompatible type "str"; expected "int"'), errors


def test_both_forms_of_op_serve(tmp_path: Path) -> None:
    ops = tmp_path / "both_forms.py"
    ops.write_text(textwrap.dedent("""
        import sidecar

        @sidecar.op
        def triple(x):
            return x * 3

        @sidecar.op()
        def plus_one(x):
            return x + 1

        @sidecar.op("forms.negate", idempotent=False)
        def negate(x):
            return -x
    """))
    worker = start_worker("--device", "cpu", "--threads", "1", "--ops", str(ops))
    try:
        with Client(worker.address, timeout=60) as client:
            x = np.arange(4.0)
            np.testing.assert_array_equal(client.call("triple", x), x * 3)
            np.testing.assert_array_equal(client.call("plus_one", x), x + 1)
            np.testing.assert_array_equal(client.call("forms.negate", x), -x)
            specs = {o["name"]: o for o in client.list_ops() if o["module"] == "both_forms"}
            assert set(specs) == {"triple", "plus_one", "forms.negate"}
            assert specs["triple"]["idempotent"] and not specs["forms.negate"]["idempotent"]
    finally:
        worker.stop()


def run_stubtest(*modules: str, stubs: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYPYPATH": str(stubs)} if stubs is not None else None
    return subprocess.run([sys.executable, "-m", "mypy.stubtest", *modules, "--allowlist", "scripts/stubtest_allowlist.txt"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False, env=env)


# That the stubs match the built modules is checked by scripts/test.sh itself (`mypy.stubtest`,
# before pytest runs: a mismatch fails the test command); here, that such a check catches one.


def test_the_c_functions_carry_their_signatures() -> None:
    # Text signatures in the C docstrings: what lets stubtest compare parameters, not only names.
    from sidecar import _cudaipc, _native

    assert str(inspect.signature(_native.unlink)) == "(name, /)"
    assert str(inspect.signature(_native.Segment.create)) == "(name, size, prefault=True)"
    assert str(inspect.signature(_native.Segment.zero)) == "(self, start, stop, /)"
    assert str(inspect.signature(_cudaipc.host_register)) == "(address, nbytes, read_only=False, device=0)"


def test_a_stub_that_disagrees_with_the_c_module_is_reported(tmp_path: Path) -> None:
    (tmp_path / "sidecar").mkdir()
    (tmp_path / "sidecar" / "__init__.pyi").write_text("")
    stub = (ROOT / "sidecar" / "_native.pyi").read_text()
    wrong = stub.replace("def unlink(name: str, /) -> None: ...", "def unlink(name: str, missing_ok: bool, /) -> None: ...")
    assert wrong != stub
    (tmp_path / "sidecar" / "_native.pyi").write_text(wrong)
    out = run_stubtest("sidecar._native", stubs=tmp_path)
    assert out.returncode == 1
    assert 'sidecar._native.unlink is inconsistent, runtime does not have parameter "missing_ok"' in out.stdout
