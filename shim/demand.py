"""Whether any of a container's fetchers serves a waiting reader right now, across its processes.

Two processes fetch for one container: the supervisor (files, on a trapped open) and the FUSE
server of big files (chunks, on a read or page fault).  Each also fetches the rest in the
background, in the workload's quiet spells, and each knew only its own readers: measured on
pysci at 100 Mbit/s, 20 ms, the FUSE server's background took 46 MB of chunks across the link
during the import phase, every miss of the supervisor queued behind its 4 MiB requests (median
miss 29.5 -> 44.8 ms) and the run step was 2.4 s longer than without it.

So each publishes here when its on-demand fetches run and when the last one ended, and each
background waits for quiet in both (`shim.pacing.is_quiet` over the later of the two).  The
board is one small file in the container's directory, mapped by both: one 8-byte slot per
process holding the CLOCK_MONOTONIC seconds (system-wide, so comparable across processes) its
last on-demand fetch ended, +inf while one runs, 0 if none ever did.  A slot is written with
one aligned 8-byte store and read likewise, so no lock crosses the processes; the board is a
hint for pacing, never a lock: whatever it says, nothing but the link's share changes.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path

#: The slots: which process publishes where.
SUPERVISOR = 0
BIG_FILES = 1
SLOTS = 2
_SLOT = struct.Struct("=d")
SIZE = SLOTS * _SLOT.size


class DemandBoard:
    """This process's slot on a container's board (created if missing), and a view of the others'."""

    def __init__(self, path: Path, slot: int) -> None:
        if not 0 <= slot < SLOTS:
            raise ValueError(f"no demand slot {slot}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            if os.fstat(fd).st_size < SIZE:
                os.ftruncate(fd, SIZE)  # both may do it at once: the same size, zeros either way
            self._map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self.slot = slot

    def busy(self) -> None:
        """An on-demand fetch of this process started (and none was running)."""
        _SLOT.pack_into(self._map, self.slot * _SLOT.size, math.inf)

    def idle(self, now: float) -> None:
        """This process's last on-demand fetch ended at `now` (monotonic seconds)."""
        _SLOT.pack_into(self._map, self.slot * _SLOT.size, now)

    def others_last(self) -> float:
        """When the other processes' last on-demand fetch ended: +inf while one runs, 0 if none
        ever did.  A value that is not a time (a damaged file) counts as busy, never as quiet
        for ever."""
        last = 0.0
        for s in range(SLOTS):
            if s != self.slot:
                (t,) = _SLOT.unpack_from(self._map, s * _SLOT.size)
                last = max(last, t if t == t and t >= 0 else math.inf)  # t != t: NaN
        return last

    def close(self) -> None:
        self._map.close()


def open_board(path: str | Path | None, slot: int, log=None) -> DemandBoard | None:
    """The board at `path` (None: this container has no other fetcher, nothing to share); a board
    that cannot be opened is said once in `log` and the process paces by its own readers alone."""
    if not path:
        return None
    try:
        return DemandBoard(Path(path), slot)
    except (OSError, ValueError) as e:
        if log is not None:
            log(f"demand board {path}: {e}: the background yields to this process's readers only")
        return None
