"""Unlink the shared memory that dead processes (or a finished run) left in /dev/shm.

The owner pid is part of every segment name, so finding what a dead process owned is a directory
listing. Only names matching `names.NAME_RE` are ever touched. A pid that was reused by a process
started after the segment was created does not keep the segment alive.
"""
from __future__ import annotations

import logging
import os

import psutil

from sidecar._native import unlink
from sidecar.dataplane.names import PREFIX, SegmentName, is_valid_name, parse_name, validate_run_id
from sidecar.dataplane.segments import SHM_DIR, segment_path

log = logging.getLogger(__name__)

__all__ = ["list_segments", "reap_dead_owners", "reap_run", "reap_owner", "owner_alive"]

# psutil's create_time has clock-tick resolution; the segment ctime is exact.
_CREATE_TIME_SLACK_S = 1.0


def list_segments(run_id: str | None = None) -> list[SegmentName]:
    """Our segments now in /dev/shm (of one run, or of every run)."""
    if run_id is not None:
        validate_run_id(run_id)
    found: list[SegmentName] = []
    with os.scandir(SHM_DIR) as it:
        for entry in it:
            if not entry.name.startswith(PREFIX):
                continue
            name = "/" + entry.name
            if not is_valid_name(name):
                continue
            parsed = parse_name(name)
            if run_id is None or parsed.run == run_id:
                found.append(parsed)
    return sorted(found)


def owner_alive(seg: SegmentName) -> bool:
    """Is the process named as owner still alive (and not a newer process reusing its pid)?"""
    if seg.pid <= 0:
        return False
    try:
        started = psutil.Process(seg.pid).create_time()
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # AccessDenied, ZombieProcess...: assume alive, never reap by guess
        return True
    try:
        created = os.stat(segment_path(seg.name)).st_ctime
    except FileNotFoundError:
        return True  # already gone: nothing to reap
    return started <= created + _CREATE_TIME_SLACK_S


def _unlink_all(segs: list[SegmentName]) -> list[str]:
    removed: list[str] = []
    for seg in segs:
        try:
            unlink(seg.name)
        except FileNotFoundError:
            continue  # someone else reaped it first
        removed.append(seg.name)
    if removed:
        log.info("reaped %d shared-memory segment(s): %s", len(removed), ", ".join(removed))
    return removed


def reap_dead_owners(run_id: str | None = None) -> list[str]:
    """Unlinks segments (of one run, or all runs) whose owner process is dead; returns their names."""
    return _unlink_all([s for s in list_segments(run_id) if not owner_alive(s)])


def reap_run(run_id: str) -> list[str]:
    """Unlinks every segment of a run, whoever owns it; returns their names."""
    return _unlink_all(list_segments(validate_run_id(run_id)))


def reap_owner(run_id: str, pid: int) -> list[str]:
    """Unlinks every segment of `run_id` owned by `pid` (e.g. a worker the pool saw die)."""
    return _unlink_all([s for s in list_segments(run_id) if s.pid == pid])
