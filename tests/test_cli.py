"""The `sidecar` command line: --version, help, and the values each option refuses."""
from __future__ import annotations

import subprocess
import sys

import pytest

import sidecar
from sidecar import cli
from tests.workers import ROOT


def test_version_from_the_command_line() -> None:
    run = subprocess.run([sys.executable, "-m", "sidecar", "--version"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert (run.returncode, run.stdout.strip()) == (0, f"sidecar {sidecar.__version__}")


def test_bare_sidecar_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sidecar") and "serve" in out and "hardware" in out and "--version" in out


@pytest.mark.parametrize("text, value", [("64K", 65536), ("0", 0), ("1M", 1 << 20), ("4096", 4096)])
def test_inline_threshold_takes_sizes_like_the_other_size_options(text: str, value: int) -> None:
    assert cli.build_parser().parse_args(["serve", "--inline-threshold", text]).inline_threshold == value


@pytest.mark.parametrize("argv, says", [
    (["--lease-ttl", "0"], "--lease-ttl: must be a finite number of seconds > 0, got 0"),
    (["--lease-ttl", "-5"], "--lease-ttl: must be a finite number of seconds > 0"),
    (["--lease-ttl", "nan"], "--lease-ttl: must be a finite number of seconds > 0"),
    (["--grace-period", "-1"], "--grace-period: must be a finite number of seconds >= 0, got -1"),
    (["--grace-period", "inf"], "--grace-period: must be a finite number of seconds >= 0"),
    (["--inline-threshold=-1K"], "--inline-threshold: must be >= 0"),
    (["--inline-threshold", "lots"], "--inline-threshold: not a byte count: 'lots'"),
    (["--max-frame-bytes", "0"], "--max-frame-bytes: must be > 0"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_values_that_make_no_sense_are_refused(capsys: pytest.CaptureFixture[str], argv: list[str],
                                               says: str) -> None:
    with pytest.raises(SystemExit) as info:  # parsing only: nothing starts even if it were accepted
        cli.build_parser().parse_args(["serve", *argv])
    assert info.value.code == cli.EXIT_USAGE
    assert says in capsys.readouterr().err


def test_zero_grace_period_is_allowed() -> None:
    args = cli.build_parser().parse_args(["serve", "--grace-period", "0", "--lease-ttl", "0.5"])
    assert (args.grace_period, args.lease_ttl) == (0.0, 0.5)
