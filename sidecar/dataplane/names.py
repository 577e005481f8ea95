"""Segment names: `/sc-<run>-<owner pid>-<random>`.

The name is the only policy on shared memory: it says which run and which process own a segment, so
the reaper can find what a dead process left behind, and a descriptor cannot point at a foreign
segment or play path tricks. Anything that does not match NAME_RE is refused.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import threading
from typing import NamedTuple

from sidecar.errors import InvalidArgument, InvalidTensorRef

log = logging.getLogger(__name__)

RUN_RE = re.compile(r"[A-Za-z0-9]{1,32}")
NAME_RE = re.compile(r"/sc-(?P<run>[A-Za-z0-9]{1,32})-(?P<pid>[0-9]{1,10})-(?P<rand>[0-9a-f]{8,32})")
PREFIX = "sc-"  # how our segments appear as files in /dev/shm (the name without its leading "/")
RAND_HEX = 16    # 64 random bits: collisions are not a practical concern (O_EXCL catches them anyway)
RUN_ENV = "SIDECAR_RUN_ID"
# Tag for every random run id this process (and what it spawns) makes up: a test session sets it, so
# that on a machine shared with other runs it counts (and cleans) only what it created itself.
RUN_PREFIX_ENV = "SIDECAR_RUN_PREFIX"
RUN_RAND_HEX = 12


class SegmentName(NamedTuple):
    run: str
    pid: int
    rand: str

    @property
    def name(self) -> str:
        return f"/sc-{self.run}-{self.pid}-{self.rand}"


def validate_run_id(run_id: str) -> str:
    """Returns run_id if it is 1-32 ASCII letters/digits, else raises InvalidArgument(field="run_id")."""
    if not isinstance(run_id, str) or not RUN_RE.fullmatch(run_id):
        raise InvalidArgument(f"run id must be 1-32 ASCII letters or digits, got {run_id!r}", field="run_id")
    return run_id


def make_name(run_id: str, pid: int | None = None) -> str:
    """A fresh segment name owned by `pid` (default: this process)."""
    validate_run_id(run_id)
    owner = os.getpid() if pid is None else pid
    if not isinstance(owner, int) or isinstance(owner, bool) or owner < 0:
        raise InvalidArgument(f"owner pid must be a non-negative int, got {owner!r}", field="pid")
    return f"/sc-{run_id}-{owner}-{secrets.token_hex(RAND_HEX // 2)}"


def parse_name(name: object) -> SegmentName:
    """Splits a segment name into its parts; anything else raises InvalidTensorRef(field="name")."""
    m = NAME_RE.fullmatch(name) if isinstance(name, str) else None
    if m is None:
        shown = name if not isinstance(name, str) or len(name) <= 80 else name[:80] + "..."
        raise InvalidTensorRef(
            f"segment name {shown!r} does not match /sc-<run>-<pid>-<random>", field="name")
    return SegmentName(m["run"], int(m["pid"]), m["rand"])


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_RE.fullmatch(name) is not None


def new_run_id() -> str:
    """A fresh random run id: $SIDECAR_RUN_PREFIX (when 1-20 letters/digits) followed by random hex."""
    prefix = os.environ.get(RUN_PREFIX_ENV, "")
    if prefix and not (len(prefix) <= 32 - RUN_RAND_HEX and RUN_RE.fullmatch(prefix)):
        log.warning("ignoring invalid %s=%r (want 1-%d ASCII letters/digits)", RUN_PREFIX_ENV, prefix,
                    32 - RUN_RAND_HEX)
        prefix = ""
    return prefix + secrets.token_hex(RUN_RAND_HEX // 2)


_run_id: str | None = None
_run_lock = threading.Lock()


def default_run_id() -> str:
    """This process's run id: $SIDECAR_RUN_ID when valid, else `new_run_id()`; fixed for the process."""
    global _run_id
    with _run_lock:
        if _run_id is None:
            env = os.environ.get(RUN_ENV)
            if env and RUN_RE.fullmatch(env):
                _run_id = env
            else:
                if env:
                    log.warning("ignoring invalid %s=%r (want 1-32 ASCII letters/digits)", RUN_ENV, env)
                _run_id = new_run_id()
        return _run_id
