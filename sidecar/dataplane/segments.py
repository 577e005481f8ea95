"""Create and open segments with our naming, mapping OS failures to structured errors.

`sidecar._native` does the syscalls; this module adds the policy: names come from `names`, a full
/dev/shm becomes `OutOfMemory(device="shm")` with the figures from statvfs, and a missing or foreign
segment named by a descriptor becomes `InvalidTensorRef(field="name")`.

A new segment is checked against what this process may still reserve *before* anything is
reserved (`check_reservable`): /dev/shm's free space and the address-space limit (RLIMIT_AS, which
`sidecar serve --memory-limit` sets). Without the check a 2 GB output under a 1 GB limit would first
reserve 2 GB of /dev/shm (posix_fallocate) and fail only at the mmap.
"""
from __future__ import annotations

import errno
import os
import resource
from pathlib import Path

from sidecar._native import Segment, unlink
from sidecar.dataplane.names import make_name, parse_name
from sidecar.errors import InvalidTensorRef, OutOfMemory

__all__ = ["SHM_DIR", "Segment", "create_segment", "open_segment", "unlink_segment", "segment_path",
           "shm_usage", "address_space_bytes", "address_space_headroom", "check_reservable"]

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


def address_space_bytes() -> int:
    """This process's current virtual size (VmSize)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def address_space_headroom() -> tuple[int, int] | None:
    """(bytes the address space may still grow by, the limit) under RLIMIT_AS; None when unlimited."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(0, soft - address_space_bytes()), soft


def check_reservable(nbytes: int, name: str) -> None:
    """OutOfMemory, before anything is reserved, when a new segment of `nbytes` cannot be mapped
    under the address-space limit (device "cpu") or does not fit in /dev/shm (device "shm")."""
    room = address_space_headroom()
    if room is not None and nbytes > room[0]:
        headroom, limit = room
        raise OutOfMemory(
            f"cannot map {nbytes} bytes for shared-memory segment {name}: the address-space limit "
            f"(RLIMIT_AS {limit} bytes, e.g. sidecar serve --memory-limit) leaves {headroom} bytes; nothing "
            f"was reserved in {SHM_DIR}", device="cpu", requested_bytes=nbytes, free_bytes=headroom,
            total_bytes=limit)
    free, total = shm_usage()
    if nbytes > free:
        raise OutOfMemory(
            f"cannot reserve {nbytes} bytes for shared-memory segment {name}: {free} of {total} bytes free "
            f"in {SHM_DIR}; nothing was reserved", device="shm", requested_bytes=nbytes, free_bytes=free,
            total_bytes=total)


def create_segment(nbytes: int, run_id: str, prefault: bool = True) -> Segment:
    """A new read-write segment of `nbytes`, named for `run_id` and this process, space reserved."""
    if not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"segment size must be a non-negative int, got {nbytes!r}")
    for attempt in range(_CREATE_TRIES):
        name = make_name(run_id)
        check_reservable(nbytes, name)
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


def open_segment(name: str, writable: bool = False, *, prefault: bool = False,
                 private: bool = False) -> Segment:
    """Maps an existing segment named by a descriptor; a bad or missing name is InvalidTensorRef.
    `prefault` maps every page now (one mmap) instead of one minor fault per 4 KiB on first touch;
    `private` maps it copy-on-write (writes stay in this process). Anything but a regular file (a
    FIFO planted under a segment name, ...) is refused without blocking."""
    parse_name(name)
    try:
        return Segment.open(name, writable, prefault, private)
    except FileNotFoundError as e:
        raise InvalidTensorRef(f"shared-memory segment {name} does not exist", field="name") from e
    except PermissionError as e:
        raise InvalidTensorRef(f"no permission to map shared-memory segment {name}", field="name") from e
    except OSError as e:  # any other refusal to map (e.g. mmap of an odd segment): the ref is unusable
        if e.errno == errno.ENODEV:  # sidecar._native: not a regular file
            raise not_regular_file(name) from e
        raise InvalidTensorRef(f"cannot map shared-memory segment {name}: {e.strerror or e}", field="name") from e


def not_regular_file(name: str) -> InvalidTensorRef:
    return InvalidTensorRef(f"shared-memory segment {name} is not a regular file (a FIFO, socket, device or "
                            f"directory under a segment name): refused", field="name")


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
