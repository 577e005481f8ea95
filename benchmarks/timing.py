"""The timing loop, the `--sizes` parsing and the `--json`/`--json-out` output every benchmark here
shares (the scripts import it as a sibling module)."""
from __future__ import annotations

import argparse
import gc
import json
import os
import time
from pathlib import Path
from typing import Any, Callable


def sample_us(fn: Callable[[], Any], repeat: int, warmup: int = 2, *, quiet_gc: bool = False) -> list[float]:
    """Microseconds per call of `fn`, `repeat` samples after `warmup` untimed calls.

    With `quiet_gc` the collector is off while a sample is timed and runs (generation 0) between
    samples, so a collection never lands inside a sub-millisecond sample.
    """
    for _ in range(warmup):
        fn()
    out: list[float] = []
    if quiet_gc:
        gc.disable()
    try:
        for _ in range(repeat):
            t0 = time.perf_counter_ns()
            fn()
            out.append((time.perf_counter_ns() - t0) / 1e3)
            if quiet_gc:
                gc.collect(0)
    finally:
        if quiet_gc:
            gc.enable()
    return out


def parse_sizes(ap: argparse.ArgumentParser, text: str, known: dict[str, int]) -> list[str]:
    """The comma-separated `--sizes` value as a list of names from `known`; an unknown one is a usage error."""
    sizes = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in known]
    if unknown:
        ap.error(f"unknown sizes {unknown}; choose from {list(known)}")
    return sizes


def emit_json(doc: dict[str, Any], json_out: str | os.PathLike[str] | None, to_stdout: bool,
              indent: int | None = 2) -> bool:
    """Writes `doc` to `json_out` (when given) and prints it (when `to_stdout`, the `--json` flag);
    True when printed: the caller then prints no table."""
    text = json.dumps(doc, indent=indent)
    if json_out:
        Path(json_out).write_text(text)
    if to_stdout:
        print(text)
    return to_stdout
