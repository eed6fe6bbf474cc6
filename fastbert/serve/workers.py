"""--workers N on one machine: N uvicorn processes on one socket, each pinned to its own slice of the cores.

uvicorn does not tell a worker its index, so each worker claims the first free slot by holding an
exclusive lock on a slot file for its whole life (a restarted worker finds its predecessor's slot free).
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

_held_locks = []  # the open slot files: closing one would free the slot


def core_slices(cores: list[int], workers: int) -> list[list[int]]:
    """`cores` split into `workers` contiguous slices, the first ones one core larger when uneven."""
    size, extra = divmod(len(cores), workers)
    slices, start = [], 0
    for index in range(workers):
        end = start + size + (1 if index < extra else 0)
        slices.append(cores[start:end] or cores[index % len(cores):index % len(cores) + 1])
        start = end
    return slices


def claim_slot(workers: int, slot_dir: str) -> int | None:
    """The index of the first slot file this process could lock, or None when all are taken."""
    for index in range(workers):
        handle = open(Path(slot_dir) / f"fastbert-serve-{os.getppid()}-slot-{index}.lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        _held_locks.append(handle)
        return index
    return None


def pin_this_worker(workers: int, slot_dir: str = "/tmp") -> int | None:
    """Pin this process to its slice of the usable cores; returns the slice size (its torch threads)."""
    if workers <= 1 or not hasattr(os, "sched_setaffinity"):
        return None
    slot = claim_slot(workers, slot_dir)
    if slot is None:
        return None
    cores = core_slices(sorted(os.sched_getaffinity(0)), workers)[slot]
    os.sched_setaffinity(0, cores)
    return len(cores)
