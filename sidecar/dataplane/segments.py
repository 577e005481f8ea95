"""Create and open segments with our naming, mapping OS failures to structured errors.

`sidecar._native` does the syscalls; this module adds the policy: names come from `names`, a full
/dev/shm becomes `OutOfMemory(device="shm")` with the figures from statvfs, and a missing or foreign
segment named by a descriptor becomes `InvalidTensorRef(field="name")`.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

from sidecar._native import Segment, unlink
from sidecar.dataplane.names import make_name, parse_name
from sidecar.errors import InvalidTensorRef, OutOfMemory

__all__ = ["SHM_DIR", "Segment", "create_segment", "open_segment", "unlink_segment", "segment_path",
           "shm_usage"]

# Where glibc's shm_open puts segments on Linux. Fixed: shm_open cannot be pointed elsewhere.
SHM_DIR = Path("/dev/shm")

# errnos that mean "no memory for this segment", as opposed to a bug or a permission problem.
_NO_SPACE = {errno.ENOSPC, errno.ENOMEM, errno.EFBIG, errno.EDQUOT}
_CREATE_TRIES = 4  # O_EXCL collisions of 64 random bits: retrying a few times is plenty


def segment_path(name: str) -> Path:
    """The file behind a (valid) segment name, e.g. /dev/shm/sc-run-12-ab12cd34."""
    return SHM_DIR / name.lstrip("/")


def shm_usage() -> tuple[int, int]:
    """(free bytes, total bytes) of /dev/shm."""
    st = os.statvfs(SHM_DIR)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def create_segment(nbytes: int, run_id: str, prefault: bool = True) -> Segment:
    """A new read-write segment of `nbytes`, named for `run_id` and this process, space reserved."""
    if not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"segment size must be a non-negative int, got {nbytes!r}")
    for attempt in range(_CREATE_TRIES):
        name = make_name(run_id)
        try:
            return Segment.create(name, nbytes, prefault)
        except FileExistsError:
            if attempt == _CREATE_TRIES - 1:
                raise
        except OSError as e:
            if e.errno not in _NO_SPACE:
                raise
            free, total = shm_usage()
            raise OutOfMemory(
                f"cannot reserve {nbytes} bytes for shared-memory segment {name}: {os.strerror(e.errno)} "
                f"({free} of {total} bytes free in {SHM_DIR})",
                device="shm", requested_bytes=nbytes, free_bytes=free, total_bytes=total) from e
    raise AssertionError("unreachable")


def open_segment(name: str, writable: bool = False, *, prefault: bool = False) -> Segment:
    """Maps an existing segment named by a descriptor; a bad or missing name is InvalidTensorRef.
    `prefault` maps every page now (one mmap) instead of one minor fault per 4 KiB on first touch."""
    parse_name(name)
    try:
        return Segment.open(name, writable, prefault)
    except FileNotFoundError as e:
        raise InvalidTensorRef(f"shared-memory segment {name} does not exist", field="name") from e
    except PermissionError as e:
        raise InvalidTensorRef(f"no permission to map shared-memory segment {name}", field="name") from e
    except OSError as e:  # any other refusal to map (e.g. mmap of an odd segment): the ref is unusable
        raise InvalidTensorRef(f"cannot map shared-memory segment {name}: {e.strerror or e}", field="name") from e


def unlink_segment(name: str, missing_ok: bool = True) -> bool:
    """Unlinks a segment by name (validated); returns False when it was already gone and missing_ok."""
    parse_name(name)
    try:
        unlink(name)
        return True
    except FileNotFoundError:
        if not missing_ok:
            raise
        return False
