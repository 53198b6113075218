"""Chunks of big files fetched before a reader asks: a learned profile's at start, then the rest.

What an earlier run of the image touched (`shim.store.profiles`, `chunks`) is fetched as soon as
the FUSE server starts, one chunk at a time in its parallel sub-ranges (`shim.store.splitread`),
each exactly as a read would fetch it
(`BigFile.ensure`: the chunk's lock, its digest, the partial file), so a reader of a chunk being
prefetched waits for that fetch and never starts a second one, and a reader of another chunk
fetches its own beside them.  With background fetch `all`, the remaining chunks follow, one at a
time in requests of tens of milliseconds of the link (`BigFile.ensure_paced`), only while no
reader has fetched for `shim.pacing.QUIET`, here or in the supervisor (`shim.demand`): a miss
waits behind one such request at most.  Once every chunk of a file is verified, it is published as
the data layer's object (`BigFile.on_complete`) and later containers read it natively.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from ..pacing import QUIET, is_quiet, request_size
from .chunked import LINK, BigFile, ChunkError

#: The profile's chunks are fetched this many at once (each in its own 4 parallel sub-ranges).
#: One: the supervisor fetches the profile's files beside them, and the workload needs those
#: first (imports) and the chunks after.  Measured on the weights image at 100 Mbit/s, 20 ms:
#: with 3 at once the start-up files took 4.0 s to arrive, with 1 2.9 s, and the run step went
#: from 7.2 s to 5.6-6.2 s (the chunks still arrive before the workload reads them).
PARALLEL = 1
#: The background starts after the first read (and a quiet spell), or after this long without any:
#: the container's start-up fills (the supervisor's) go first on the link.
START_IDLE = 5.0
#: The background gives up after this many chunks failed (a registry gone): readers still fetch.
MAX_FAILURES = 8

Log = Callable[[str], None]


class Readers:
    """Readers' chunk fetches in flight and when the last one ended, here and (through the
    container's demand board, `shim.demand`) in the supervisor: what the background yields to."""

    def __init__(self, board=None) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._last = 0.0
        self.first_read = threading.Event()
        self.board = board  # a shim.demand.DemandBoard, or None: this process's readers alone

    @contextlib.contextmanager
    def fetching(self) -> Iterator[None]:
        with self._cond:
            self._active += 1
            if self._active == 1 and self.board is not None:
                self.board.busy()
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._last = time.monotonic()
                if not self._active and self.board is not None:
                    self.board.idle(self._last)
                self._cond.notify_all()

    def _last_demand(self, now: float) -> float:
        """When the last on-demand fetch of either process ended (one running elsewhere: now)."""
        if self.board is None:
            return self._last
        return max(self._last, min(self.board.others_last(), now))

    def quiet(self) -> bool:
        """No reader fetches, here or in the supervisor, and none did for QUIET."""
        now = time.monotonic()
        return is_quiet(self._active, self._last_demand(now), now)

    def wait_quiet(self) -> None:
        """Return once no reader fetches and none did for QUIET (the supervisor's are polled:
        another process cannot wake this condition)."""
        with self._cond:
            while True:
                now = time.monotonic()
                last = self._last_demand(now)
                if is_quiet(self._active, last, now):
                    return
                self._cond.wait(QUIET if self._active else last + QUIET - now)


def profile_plan(files: Sequence[BigFile], chunks: Sequence[tuple[str, str, int, list[int]]],
                 log: Log) -> list[tuple[BigFile, int]]:
    """The profile's chunks of the files served here and not verified yet, in first-touch order
    (file by file).  A profile file matches by content digest and size (by name and size where
    the TOC has no digest); an index beyond the file's chunks says the profile is of another
    file: that file's entry is skipped."""
    by_key: dict[tuple[str, int], BigFile] = {}
    for f in files:
        by_key.setdefault((f.entry.digest or f.entry.name, f.entry.size), f)
    plan: list[tuple[BigFile, int]] = []
    for name, digest, size, ks in chunks:
        f = by_key.get((digest or name, size))
        if f is None:
            continue
        if max(ks) >= len(f.entry.chunks):
            log(f"profile: chunk {max(ks)} of {name[:80]!r} is beyond its {len(f.entry.chunks)} chunks: not used")
            continue
        plan += [(f, k) for k in ks if not f.verified[k]]
    return plan


def _fetch_in_threads(items: list[tuple[BigFile, int]], parallel: int, name: str, split: bool,
                      failed: Callable[[BaseException], None]) -> list[threading.Thread]:
    """Start `parallel` daemon threads that take the chunks of `items` in order, one each at a
    time, through `BigFile.ensure`; a chunk that fails is reported to `failed` and left to its
    reader (who gets EIO if it fails again).  Daemon threads, not an executor: a server told to
    stop must not wait for the rest."""
    todo = iter(items)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                item = next(todo, None)
            if item is None:
                return
            f, k = item
            try:
                f.ensure(k, split=split)
            except (ChunkError, OSError) as e:
                failed(e)

    threads = [threading.Thread(target=worker, daemon=True, name=name) for _ in range(parallel)]
    for t in threads:
        t.start()
    return threads


def prefetch(plan: list[tuple[BigFile, int]], log: Log, parallel: int = PARALLEL) -> None:
    """Fetch the plan's chunks now, `parallel` at once, first touched first; returns when done."""
    if not plan:
        return
    t0 = time.monotonic()
    errors: list[BaseException] = []

    def failed(e: BaseException) -> None:
        errors.append(e)  # list.append is atomic: no lock needed
        log(f"profile prefetch: {e}")

    for t in _fetch_in_threads(plan, parallel, "chunk-prefetch", True, failed):
        t.join()
    log(f"profile prefetch of {len(plan)} chunks done in {time.monotonic() - t0:.2f} s ({len(errors)} failed)")


def background(files: Sequence[BigFile], readers: Readers, log: Log, start_idle: float = START_IDLE) -> None:
    """Fetch every chunk not verified yet, one at a time, each once readers are quiet."""
    readers.first_read.wait(start_idle)
    t0 = time.monotonic()
    fetched = failed = 0
    for f in files:
        for k in range(len(f.entry.chunks)):
            if f.verified[k]:
                continue
            try:
                have: bytes | None = b""
                while have is not None:  # paused whenever a reader came, then on from where it was
                    readers.wait_quiet()
                    have = f.ensure_paced(k, have, request_size(LINK.rate()), readers.quiet)
                fetched += 1
            except (ChunkError, OSError) as e:
                failed += 1
                log(f"background: {e}")
                if failed >= MAX_FAILURES:
                    log(f"background fetch of chunks stopped after {failed} failures")
                    return
    log(f"background fetch of {fetched} chunks done in {time.monotonic() - t0:.2f} s ({failed} failed)")


def start(files: Sequence[BigFile], plan: list[tuple[BigFile, int]], everything: bool, readers: Readers,
          log: Log) -> threading.Thread | None:
    """The profile's chunks now, then (`everything`) the rest paced, in a thread of their own."""
    if not plan and not everything:
        return None

    def run() -> None:
        prefetch(plan, log)
        if everything:
            background(files, readers, log)

    t = threading.Thread(target=run, daemon=True, name="chunk-warm")
    t.start()
    return t


#: An executable's or shared library's chunks are fetched this many at once once its header is in.
DENSE_PARALLEL = 3
ELF_MAGIC = b"\x7fELF"


def is_dense(f: BigFile) -> bool:
    """Read nearly whole once opened: an ELF file (the loader maps it and its code and data pages
    fault in all over it; measured on gcc's 30 MB cc1: 7 chunk faults one after the other, 1.4 s
    of the run, against 1.0 s for its 12.8 MB at the link's rate).  Known once chunk 0 is verified."""
    if not f.verified[0] or f.entry.chunks[0].zeros:
        return False
    return os.pread(f.fd, len(ELF_MAGIC), 0) == ELF_MAGIC


def fetch_whole(f: BigFile, log: Log, parallel: int = DENSE_PARALLEL) -> list[threading.Thread]:
    """Every chunk of `f` not verified yet, `parallel` at once in single requests (a few
    connections fill the link; sub-ranges of each would open a dozen), in file order, in
    daemon threads (returned, started).  Each goes through `BigFile.ensure`, so a reader's fault
    on one of them waits for that fetch; a failure is left to the reader who needs the chunk."""
    todo = [(f, k) for k in range(len(f.entry.chunks)) if not f.verified[k]]
    return _fetch_in_threads(todo, parallel, "chunk-dense", False,
                             lambda e: log(f"readahead of {f.entry.name!r}: {e}"))
