"""An op that holds its slot until the test lets it go (`--ops tests.hold_ops_module`).

Tests synchronise on files, not on sleeps: `hold` touches `started` once it runs, then returns its
input when `release` exists (or early, when the caller has gone).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import sidecar


@sidecar.op("hold", idempotent=False)
def hold(x: Any, *, started: str, release: str, ctx: Any = None) -> Any:
    """Touches `started`, waits until the file `release` exists, returns x."""
    Path(started).touch()
    while not os.path.exists(release):
        if ctx is not None and ctx.is_cancelled():
            break
        time.sleep(0.002)
    return x
