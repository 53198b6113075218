"""Fill placeholder files with their verified content.

A fill fetches the compressed ranges of one file, decodes each chunk, checks it against
its digest and only then writes it in place (same inode: overlayfs and every fd already
open see it) into the placeholder.

Durability stays off the answer's path: a committed file is filled in this process's memory
at once (the opener is answered), and the layer's byte map on disk is marked only after a
batched `syncfs` in the background (`Syncer`), so a crash can cost a refetch but never
serve a hole.

A miss reads ahead: the next files in blob order, inside an adaptive window, are claimed
before one request for their bytes is sent beside the missed file's own, and each is
committed only once its own digests match.  Two opens of the same file wait on one fetch
(in-process events); two processes filling the same layer serialise on an flock of the
placeholder itself.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import hashlib
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from ..errors import LazyshimError
from ..formats.chunks import decode_chunk
from ..formats.toc import Entry, FormatError
from ..pacing import RateMeter
from ..ranges import Span, merge
from . import splitread
from .marks import COMPLETE_MARK, create_filled_map, filled_map_path, is_complete, mark_complete  # noqa: F401
from .metadata import LayerMeta

#: One range request fetches at most this much, so a huge file streams in pieces.
MAX_REQUEST = 32 << 20
#: Readahead on a miss: the window of neighbouring files (compressed bytes past the missed
#: file) starts here, doubles on every miss just past the previous window, and is capped.
READAHEAD_START = 512 << 10
READAHEAD_MAX = 8 << 20
#: A window is fetched in requests of about this size, this many in flight (over as many connections).
READAHEAD_PIECE = 1 << 20
READAHEAD_PARALLEL = 2
#: A missed file bigger than this (compressed) is fetched before its window, not beside it.
AHEAD_AFTER = 256 << 10
#: A missed file's own payload of at least this many bytes is fetched as parallel sub-ranges
#: (`shim.store.splitread`): traced on py, python3.11 (2.9 MB) took 0.51 s in one request.
SPLIT_FROM = 1 << 20
#: Files closer than this in the blob share a request (the bytes between are fetched too).
MERGE_GAP = 64 << 10
#: Range requests a filler has in flight beside on-demand fills (readahead, parallel prefetch).
PARALLEL_REQUESTS = 8
#: The background fetch takes the unfilled files up to this far (compressed bytes) past a recent
#: miss beside the workload; farther ones wait for the sweep.  It remembers this many misses.
NEAR_MISS = 4 << 20
HOT_MISSES = 4
#: Every range request of the process, measured: the background fetch sizes its requests by it.
LINK = RateMeter()
_ZERO_BLOCK = bytes(1 << 20)
#: Bytes fetched ahead for several files: (blob offset, data, the source's token for who served them).
Fetched = tuple[int, bytes, object]


#: A file whose bytes fail verification is fetched again from this many further endpoints
#: (a source that can tell which endpoint served them and can set it aside), then EIO.
RETRY_SOURCES = 2


class FillError(LazyshimError):
    """A file could not be filled (fetch failed, digest mismatch): the opener gets EIO."""


class BadBytes(FillError):
    """Bytes that do not decode or match their digest; `origin` is the source's token for
    whoever served them (None if the source cannot say)."""

    def __init__(self, message: str, origin: object = None) -> None:
        super().__init__(message)
        self.origin = origin


class BlobSource(Protocol):
    """Where a layer's compressed bytes come from (a registry, a local blob file).

    A source of several endpoints may also offer `last_origin()` (a token for the endpoint
    that served this thread's last read) and `reject(token)` (set that endpoint aside for
    this blob): the filler then refetches a file whose bytes failed verification from the
    next endpoint instead of failing the open."""

    def read_range(self, start: int, end: int) -> bytes: ...


class FileBlobSource:
    """A blob on local disk (tests, `convert`, already-downloaded layers)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read_range(self, start: int, end: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
        if len(data) != end - start:
            raise FillError(f"blob {self.path} is shorter than expected")
        return data


_POOL: ThreadPoolExecutor | None = None
_POOL_GUARD = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """The process's pool for requests beside on-demand fills (readahead, parallel prefetch,
    background fetch)."""
    global _POOL
    with _POOL_GUARD:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=PARALLEL_REQUESTS, thread_name_prefix="readahead")
        return _POOL


request_pool = _pool


class Syncer:
    """Makes committed fills durable off the answer's path: one background thread batches
    them, flushes each file system once (`syncfs`) and only then marks them in the layers'
    byte maps.  A crash before the mark costs a refetch; a mark never precedes its data."""

    #: How long the thread lets commits gather before one flush (a batch, not a timer anyone waits on).
    BATCH = 0.05

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: dict[LayerFiller, list[int]] = {}
        self._busy = False
        self._thread: threading.Thread | None = None

    def add(self, filler: LayerFiller, indices: list[int]) -> None:
        with self._cond:
            self._pending.setdefault(filler, []).extend(indices)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="syncer")
                self._thread.start()
            self._cond.notify_all()

    def flush(self) -> None:
        """Return once everything committed so far is durable and marked (or failed to be)."""
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                batch, self._pending = self._pending, {}
            else:
                self._cond.wait_for(lambda: not self._pending and not self._busy)
                return
        self._sync(batch)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending)
                self._cond.wait(self.BATCH)
                batch, self._pending = self._pending, {}
                self._busy = True
            try:
                self._sync(batch)
            except Exception:  # noqa: BLE001, S110 - unmarked files are refetched; the thread must live
                pass
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    @staticmethod
    def _sync(batch: dict[LayerFiller, list[int]]) -> None:
        synced: set[Path] = set()
        for filler, indices in batch.items():
            try:
                if filler.tree not in synced:
                    sync_dir(filler.tree)
                    synced.add(filler.tree)
                filler._mark_filled(indices)
            except (OSError, LazyshimError):
                pass  # left unmarked: a later fill refetches, nothing is served from it


SYNCER = Syncer()
atexit.register(SYNCER.flush)


class LayerFiller:
    """Fills the files of one layer's placeholder tree on demand."""

    def __init__(self, layer_dir: Path, meta: LayerMeta, source_factory: Callable[[], BlobSource],
                 tree: Path | None = None) -> None:
        self.dir = layer_dir
        self.tree = tree or layer_dir / "tree"  # where the data is written: what a flush syncs
        self.meta = meta
        self._source_factory = source_factory
        self._source: BlobSource | None = None
        fd = os.open(filled_map_path(layer_dir), os.O_RDWR | os.O_CLOEXEC)
        try:
            self.filled = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        # Filled in this process, durable or not yet: what opens are answered from.
        self.ready = bytearray(len(self.filled))
        self._lock = threading.Lock()
        self._inflight: dict[int, threading.Event] = {}
        self._wanted: set[int] = set()  # claimed files an open waits for
        self._order: _BlobOrder | None = None
        self._window = READAHEAD_START
        self._window_end = -1  # where the last readahead ended in the blob
        # Background fetch: blob positions just past recent misses (newest first), a sweep over
        # the rest, and when the last miss was (the layer whose workload is busy goes first).
        self._hot: deque[tuple[int, int]] = deque(maxlen=HOT_MISSES)  # (position, blob offset it ends at)
        self._sweep = 0
        self._sweep_passes = 0
        self.last_miss = 0.0
        self.readahead = True
        # Entries another server fills (the container's FUSE layer of big files): never here.
        self.served_elsewhere: set[int] = set()
        # Counted by on-demand, readahead and prefetch threads at once: `+=` is no atomic step.
        self._counts = threading.Lock()
        self.bytes_fetched = 0
        self.files_filled = 0
        self.requests = 0
        self.errors: list[str] = []  # the last prefetch's failures
        if not is_complete(layer_dir):
            self._check_marks()
        # An upper bound, not a recount: files without a mark (a stat each to tell which of
        # them another layer brought in would cost a supervisor's start ~5 us a file).  Those
        # found filled later are marked, and counted down, as they are found; reaching 0
        # recounts (`_mark_filled`), and so does `LazyRoot.complete`.
        self.unfilled = self.count_unmarked()
        if not self.unfilled:
            self.mark_complete()

    def _check_marks(self) -> None:
        """Drop marks whose data a crash may have lost (v1 marks only after a flush: none)."""

    def count_unfilled(self) -> int:
        """Regular files with data not yet durable (fills by other processes included)."""
        is_filled = self.is_filled
        return sum(1 for i in self.meta.table.data_files() if not is_filled(i))

    def count_unmarked(self) -> int:
        """Regular files without a durable mark in the byte map (no file is looked at)."""
        filled = self.filled
        return sum(1 for i in self.meta.table.data_files() if not filled[i])

    def is_filled(self, idx: int) -> bool:
        """Entry idx's data is in place (the byte map is shared by every process of the store)."""
        return bool(self.filled[idx] or self.ready[idx])

    def mark_complete(self) -> None:
        """Every file is filled: once each is durably marked, the layer is (the runtime then
        skips the supervisor).  Not yet if a file is filled only in memory."""
        SYNCER.flush()
        if not self._all_marked():
            return
        sync_dir(self.tree)
        mark_complete(self.dir)

    def _all_marked(self) -> bool:
        filled = self.filled
        return all(filled[i] for i in self.meta.table.data_files())

    @property
    def source(self) -> BlobSource:
        if self._source is None:
            self._source = self._source_factory()
        return self._source

    # ---- on demand -----------------------------------------------------------------------
    def fill(self, idx: int, neighbours: bool = True) -> None:
        """Make entry `idx` readable; returns when it is (or raises FillError).  Its
        neighbours in the blob are fetched beside it and committed as they arrive (unless
        not `neighbours`: a file asked for by name, not by a workload's miss, says nothing of them)."""
        for _attempt in (0, 1):
            if self.is_filled(idx):
                return
            with self._lock:
                ev = self._inflight.get(idx)
                owner = ev is None
                if owner:
                    ev = self._inflight[idx] = threading.Event()
                else:
                    self._wanted.add(idx)  # its batch commits it before the files nobody waits for
            if owner:
                break
            ev.wait()  # a readahead or another open has it; if that failed, try once ourselves
        else:
            if self.is_filled(idx):
                return
            raise FillError(f"filling {self.meta.toc.entries[idx].name!r} failed")
        ahead: list[int] = []
        later = False
        try:
            ahead = self._claim_window(idx) if self.readahead and neighbours else []
            # A big missed file first, its neighbours after it: beside it they would take most of
            # the link from the one file an open waits for.  A small one's request is a round
            # trip either way, and the neighbours' requests are best already in flight.
            s, e = self.meta.table.span(idx)
            later = bool(ahead) and e - s > AHEAD_AFTER
            if ahead and not later:
                self._read_ahead(ahead)
            self._note_miss(ahead[-1] if ahead else idx)
            self._fill_locked(idx, None)
        finally:
            self._release([idx])
            if later:
                self._read_ahead(ahead)

    def _read_ahead(self, claimed: list[int]) -> None:
        """Fetch a claimed window in pieces of READAHEAD_PIECE, in blob order, READAHEAD_PARALLEL
        at once: the files at the front of a big window are committed after their own piece, not
        after the whole window, and the link stays full meanwhile."""
        table = self.meta.table
        position = self._blob_order().position
        pieces: list[list[int]] = []
        start = last = -1
        for i in claimed:
            s, e = table.span(i)
            # A file the window skipped (in flight for another fill, or filled) ends the piece:
            # a piece is fetched as one range, which would bring that file's bytes a second time.
            if not pieces or e - start > READAHEAD_PIECE or position[i] != last + 1:
                pieces.append([])
                start = s
            pieces[-1].append(i)
            last = position[i]
        queue = iter(pieces)
        guard = threading.Lock()

        def run() -> None:
            while True:
                with guard:
                    piece = next(queue, None)
                if piece is None:
                    return
                self._fill_claimed(piece)

        pool = _pool()
        try:
            for _ in range(min(READAHEAD_PARALLEL, len(pieces))):
                pool.submit(run)
        except RuntimeError:  # the process is ending: the claims must still go
            self._release(claimed)

    def _note_miss(self, idx: int) -> None:
        """The workload needed entry idx (or read ahead up to it): the background fetch goes on from there."""
        order = self._blob_order()
        p = order.position[idx]
        if p >= 0:
            with self._lock:
                self._hot.appendleft((p + 1, order[p][1] + NEAR_MISS))
                self.last_miss = time.monotonic()

    def _blob_order(self) -> _BlobOrder:
        if self._order is None:
            self._order = _BlobOrder(self.meta.table)
        return self._order

    def _claim_window(self, idx: int) -> list[int]:
        """Claim the unfilled files after `idx` in blob order inside the readahead window, and
        adapt the window: a miss just past the last window doubles it, any other resets it."""
        order = self._blob_order()
        p = order.position[idx]
        if p < 0:
            return []
        starts, ends, files = order.starts, order.ends, order.files
        start, end = starts[p], ends[p]
        with self._lock:
            if self._window_end >= 0 and self._window_end - MERGE_GAP <= start <= self._window_end + self._window:
                self._window = min(self._window * 2, READAHEAD_MAX)
            else:
                self._window = READAHEAD_START
            limit = end + self._window
            claimed: list[int] = []
            last = end
            for q in range(p + 1, len(files)):
                s, e, j = starts[q], ends[q], files[q]
                if e > limit or s > last + MERGE_GAP:
                    break
                if self.ready[j] or self.filled[j] or j in self._inflight:
                    continue
                self._inflight[j] = threading.Event()
                claimed.append(j)
                last = e
            self._window_end = last
        return claimed

    def claim_background(self, allowed: bytearray, max_bytes: int, sweep: bool = True) -> tuple[list[int], bool]:
        """Claim the next unfilled files the background fetch should bring in, in one run of
        the blob of at most `max_bytes` (a single larger file stays whole), and say whether they
        are near a miss: just past a recent miss first (the workload reads on from there), else,
        if `sweep`, the next in blob order.  Only files with `allowed[idx]` set.

        ([], False) with `sweep` means nothing is left (after a second pass over the layer,
        which picks up files whose earlier fill failed); without it, only that no file is near."""
        order = self._blob_order()
        with self._lock:
            while self._hot:
                p, limit = self._hot[0]
                p = self._next_unclaimed(order, p, allowed, limit)
                if p is None:
                    self._hot.popleft()
                    continue
                claimed = self._claim_run(order, p, allowed, min(max_bytes, limit - order[p][0]))
                self._hot[0] = (order.position[claimed[-1]] + 1, limit)
                return claimed, True
            while sweep and self._sweep_passes < 2:
                p = self._next_unclaimed(order, self._sweep, allowed, None)
                if p is None:
                    self._sweep, self._sweep_passes = 0, self._sweep_passes + 1
                    continue
                claimed = self._claim_run(order, p, allowed, max_bytes)
                self._sweep = order.position[claimed[-1]] + 1
                return claimed, False
        return [], False

    def _next_unclaimed(self, order: _BlobOrder, p: int, allowed: bytearray,
                        limit: int | None) -> int | None:
        """The first position from p whose file is allowed, unfilled and unclaimed, starting
        before `limit` (a blob offset; None: anywhere).  Called with the lock held."""
        while p < len(order):
            s, _, j = order[p]
            if limit is not None and s > limit:
                return None
            if allowed[j] and not self.ready[j] and not self.filled[j] and j not in self._inflight:
                return p
            p += 1
        return None

    def _claim_run(self, order: _BlobOrder, p: int, allowed: bytearray, max_bytes: int) -> list[int]:
        """Claim the file at p and those after it that share its request.  Lock held."""
        start, last, _ = order[p]
        claimed: list[int] = []
        for q in range(p, len(order)):
            s, e, j = order[q]
            if claimed and (s > last + MERGE_GAP or e - start > max_bytes):
                break
            if allowed[j] and not self.ready[j] and not self.filled[j] and j not in self._inflight:
                self._inflight[j] = threading.Event()
                claimed.append(j)
                last = max(last, e)
        return claimed

    def _next_commit(self, live: list[int]) -> int:
        """Take the next file of a fetched batch to commit: one an open waits for, else the
        first in blob order."""
        with self._lock:
            for i in self._wanted:  # a handful at most: one per waiting open
                if i in live:
                    live.remove(i)
                    return i
            return live.pop(0)

    def release(self, indices: list[int]) -> None:
        """Give up claims (of `claim_background`) without filling: an open fills them itself."""
        self._release(indices)

    def _release(self, indices: list[int]) -> None:
        with self._lock:
            events = [self._inflight.pop(i) for i in indices if i in self._inflight]
            self._wanted.difference_update(indices)
        for ev in events:
            ev.set()

    def fill_claimed(self, claimed: list[int]) -> int:
        """Fetch files claimed by `claim_background` with one request, commit each that
        verifies, release all; returns how many failed."""
        before = len(self.errors)
        self._fill_claimed(claimed)
        return len(self.errors) - before

    def _fill_claimed(self, claimed: list[int]) -> None:
        """Fetch the claimed files with one request, commit each that verifies; release all."""
        try:
            table = self.meta.table
            live = [i for i in claimed if not self.is_filled(i)]
            if not live:
                return
            spans = [table.span(i) for i in live]
            start, end = min(s for s, _ in spans), max(e for _, e in spans)
            fetched = None
            if end - start <= MAX_REQUEST:
                try:
                    fetched = (start, *self._read(table.name(live[0]), start, end))
                except FillError as err:
                    self.errors.append(str(err))
                    return
                with self._counts:
                    self.bytes_fetched += end - start
            while live:
                i = self._next_commit(live)
                try:
                    self._fill_locked(i, fetched)
                except FillError as err:
                    self.errors.append(str(err))
                finally:
                    self._release([i])  # its opener goes on now, not after the whole run
        except Exception as err:  # noqa: BLE001 - a pool thread: the claims must still go
            self.errors.append(f"readahead: {err!r}")
        finally:
            self._release(claimed)

    # ---- without being asked ------------------------------------------------------------
    def prefetch(self, indices: list[int], pause: Callable[[], None], gap: int = MERGE_GAP,
                 max_request: int = 1 << 20, parallel: int = 1, on_claimed: Callable[[], None] | None = None,
                 need_order: bool = False) -> int:
        """Fill many files with few range requests (runs of adjacent payloads, `shim.ranges`),
        up to `parallel` requests at once.  Files are claimed before their request is sent,
        so an open of one waits for those bytes instead of asking again; with `on_claimed`
        all of them before the first request, then it is called (a start-up set: the opens
        that need it must never race it).  `need_order`: `indices` are in the order the
        workload needs them, and the requests go out in that order (else in blob order).

        `pause` is called before every request and may block: on-demand fills come first.
        Returns the number of files that failed (they stay unfilled; an open retries them).
        """
        table = self.meta.table
        spans = merge(((*table.span(i), i) for i in indices
                       if table.has_chunks(i) and not self.is_filled(i)), gap, max_request)
        self.errors = []
        if need_order:
            rank = {i: n for n, i in enumerate(indices)}
            spans.sort(key=lambda span: min(rank[i] for i in span.keys))
        claims = [self._claim(span) for span in spans] if on_claimed else [None] * len(spans)
        if on_claimed:
            on_claimed()
        if parallel <= 1:
            for span, claim in zip(spans, claims, strict=True):
                self._prefetch_span(span, pause, claim)
        else:
            sem = threading.Semaphore(parallel)
            futures = []
            for span, claim in zip(spans, claims, strict=True):
                sem.acquire()
                fut = _pool().submit(self._prefetch_span, span, pause, claim)
                fut.add_done_callback(lambda _f: sem.release())
                futures.append(fut)
            for fut in futures:
                fut.result()
        return len(self.errors)

    def _claim(self, span: Span) -> tuple[list[int], list[tuple[int, threading.Event]]]:
        """Claim the span's files nobody has claimed: (claimed, [(index, event) claimed elsewhere])."""
        with self._lock:
            claimed = [i for i in span.keys if not self.ready[i] and not self.filled[i] and i not in self._inflight]
            elsewhere = [(i, self._inflight[i]) for i in span.keys if i in self._inflight]
            for i in claimed:
                self._inflight[i] = threading.Event()
        return claimed, elsewhere

    def _prefetch_span(self, span: Span, pause: Callable[[], None], claim=None) -> None:
        if claim is None:
            pause()  # before claiming: an open waiting on a claim must never wait for the pause
            claim = self._claim(span)
        claimed, elsewhere = claim
        if claimed:
            self._fill_claimed(claimed)
        # Files a concurrent fill or readahead had claimed: done only once their bytes are
        # (a caller such as `fill_many` or `lazyshim fetch` relies on "returned" meaning "in place").
        for i, ev in elsewhere:
            ev.wait()
            if not self.is_filled(i):
                self.errors.append(f"filling {self.meta.toc.entries[i].name!r} failed")

    def fill_many(self, indices: list[int], max_request: int = MAX_REQUEST) -> None:
        """Fill many files now, in few requests; raises FillError naming the first failure."""
        if self.prefetch(indices, lambda: None, max_request=max_request):
            raise FillError(f"{len(self.errors)} files failed; first: {self.errors[0]}")
        SYNCER.flush()

    # ---- committing ---------------------------------------------------------------------
    def _commit(self, idx: int) -> None:
        """Entry idx's bytes are verified and in place: readable now, durable later."""
        self.ready[idx] = 1
        with self._counts:
            self.files_filled += 1
        SYNCER.add(self, [idx])

    def _mark_filled(self, indices: list[int]) -> None:
        """After the flush: the marks every process of the store sees."""
        for i in indices:
            self.filled[i] = 1
        self.unfilled -= len(indices)
        if self.unfilled <= 0:
            self.unfilled = self.count_unfilled()  # shared objects may have filled others
            if not self.unfilled and self._all_marked():
                sync_dir(self.tree)
                mark_complete(self.dir)

    def _fill_locked(self, idx: int, fetched: Fetched | None = None) -> bool:
        """Write entry idx in place and commit it.  False if another process had already
        filled it."""
        e = self.meta.toc.entries[idx]
        path = self.tree / e.name
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            restore_mode = None
        except PermissionError:
            # Rootless stores own the files with their image modes (e.g. 0444).
            os.chmod(path, e.mode | 0o600, follow_symlinks=False)
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
            restore_mode = e.mode
        except OSError as err:
            raise FillError(f"filling {e.name!r}: {err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self.filled[idx] or self.ready[idx]:
                return False  # another process filled it while we waited
            if self._verified_in_place(fd, e):
                self._commit(idx)  # its mark was lost (a process killed before its flush): no refetch
                return True
            self._write_verified(fd, e, fetched)
            os.utime(fd, (e.mtime, e.mtime))  # writing moved mtime; the image's must show
            if restore_mode is not None or os.fstat(fd).st_mode & 0o7777 != e.mode:
                os.fchmod(fd, e.mode)
            self._commit(idx)
            return True
        except BaseException as err:
            _discard(fd, e)  # verified pieces of a failed file must not linger as data
            if isinstance(err, OSError | FormatError):
                raise FillError(f"filling {e.name!r}: {err}") from err
            raise
        finally:
            os.close(fd)

    @staticmethod
    def _verified_in_place(fd: int, e: Entry) -> bool:
        """The placeholder already holds e's bytes, checked against the TOC once more.

        A process killed after a fill but before its flush leaves the verified bytes in place
        unmarked; readers it had answered may hold the file open, so refilling it (and, if
        that fetch failed, making it sparse again) could take bytes from under them.  A
        sparse placeholder (no data block) holds nothing: the usual case costs one fstat."""
        data_chunks = [c for c in e.chunks if not c.zeros]
        if not data_chunks or os.fstat(fd).st_blocks == 0:
            return False
        if e.digest:
            h = hashlib.sha256()
            for off in range(0, e.size, 1 << 20):
                piece = os.pread(fd, min(1 << 20, e.size - off), off)
                if not piece:
                    return False
                h.update(piece)
            return "sha256:" + h.hexdigest() == e.digest
        if not all(c.digest for c in data_chunks):
            return False
        for c in data_chunks:
            piece = os.pread(fd, c.size, c.file_offset)
            if "sha256:" + hashlib.sha256(piece).hexdigest() != c.digest:
                return False
        return True

    def _read(self, name: str, start: int, end: int, split: bool = False) -> tuple[bytes, object]:
        """The bytes of [start, end) and the source's token for who served them; with `split`,
        a range of SPLIT_FROM or more comes as parallel sub-ranges (the token is then the first
        part's: a mismatch is refetched in one request, which names its endpoint truly)."""
        split = split and end - start >= SPLIT_FROM
        with self._counts:
            self.requests += len(splitread.parts(start, end)) if split else 1
        source = self.source
        try:
            t0 = time.monotonic()
            data = splitread.read_split(source, start, end) if split else source.read_range(start, end)
            LINK.record(t0, time.monotonic(), len(data))
        except FillError:
            raise
        except Exception as err:  # the source's own errors (network, registry) end this fill
            raise FillError(f"fetching {name!r}: {err}") from err
        last = getattr(source, "last_origin", None)
        return data, last() if last is not None else None

    def _write_verified(self, fd: int, e: Entry, fetched: Fetched | None) -> None:
        """Write e's verified content; bytes that fail verification set their endpoint aside
        (a mirror serving wrong bytes) and are fetched again from the next, up to
        RETRY_SOURCES times.  Nothing unverified stays in the file."""
        for attempt in range(RETRY_SOURCES + 1):
            try:
                self._write_content(fd, e, fetched, split=attempt == 0)
                return
            except BadBytes as err:
                reject = getattr(self.source, "reject", None)
                if attempt == RETRY_SOURCES or err.origin is None or reject is None:
                    raise
                reject(err.origin)
                _discard(fd, e)
                fetched = None

    def _write_content(self, fd: int, e: Entry, fetched: Fetched | None, split: bool = False) -> None:
        """Decode, verify and write e's chunks (in file order, so the whole-file hash runs
        once over the stream); a file of one chunk whose digest is the file's is hashed once."""
        chunks = e.chunks
        whole = hashlib.sha256() if e.digest and not (len(chunks) == 1 and chunks[0].digest == e.digest) else None
        all_chunk_digests = all(c.digest or c.zeros for c in chunks)
        staged: list[tuple[int, bytes]] = []
        spans = merge(((c.offset, c.end, k) for k, c in enumerate(chunks) if not c.zeros), 0, MAX_REQUEST)
        span_of = {k: s for s in spans for k in s.keys}
        cur: Span | None = None
        data, origin = b"", None
        for k, c in enumerate(chunks):
            if c.zeros:
                if whole is not None:
                    _hash_zeros(whole, c.size)
                continue
            span = span_of[k]
            if span is not cur:
                cur = span
                if fetched is not None and fetched[0] <= span.start and span.end <= fetched[0] + len(fetched[1]):
                    data = fetched[1][span.start - fetched[0]: span.end - fetched[0]]  # already downloaded
                    origin = fetched[2]
                else:
                    data, origin = self._read(e.name, span.start, span.end, split)
                    with self._counts:
                        self.bytes_fetched += len(data)
            try:
                piece = decode_chunk(self.meta.format, data[c.offset - span.start: c.end - span.start],
                                     c.inner_offset, c.size)
            except FormatError as err:
                raise BadBytes(f"{e.name!r}: chunk at {c.file_offset}: {err}", origin) from err
            if c.digest and "sha256:" + hashlib.sha256(piece).hexdigest() != c.digest:
                raise BadBytes(f"{e.name!r}: chunk at {c.file_offset} does not match its digest", origin)
            if whole is not None:
                whole.update(piece)
            if all_chunk_digests:
                os.pwrite(fd, piece, c.file_offset)
            else:
                staged.append((c.file_offset, piece))
        if whole is not None and "sha256:" + whole.hexdigest() != e.digest:
            raise BadBytes(f"{e.name!r}: content does not match its digest", origin)
        for off, piece in staged:  # verified as a whole, only now written
            os.pwrite(fd, piece, off)


class _BlobOrder:
    """A layer's files with data in blob order, as arrays (a supervisor keeps this for the
    life of the container: 20 bytes a file, where tuples and a dict took about 200)."""

    __slots__ = ("starts", "ends", "files", "position")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, p: int) -> tuple[int, int, int]:
        """(start, end, entry index) of the p-th file in blob order."""
        return self.starts[p], self.ends[p], self.files[p]

    def __init__(self, table) -> None:
        import array

        files = [i for i in table.data_files() if table.has_chunks(i)]
        spans = [table.span(i) for i in files]
        order = sorted(range(len(files)), key=spans.__getitem__)
        self.starts = array.array("Q", [spans[k][0] for k in order])
        self.ends = array.array("Q", [spans[k][1] for k in order])
        self.files = array.array("I", [files[k] for k in order])
        self.position = array.array("i", [-1]) * len(table)  # entry index -> place in the order
        for p, i in enumerate(self.files):
            self.position[i] = p


_libc = ctypes.CDLL(None, use_errno=True)


def sync_dir(path: Path) -> None:
    """syncfs of the file system holding `path`: one flush for many files."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _syncfs(fd)
    finally:
        os.close(fd)


def _syncfs(fd: int) -> None:
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise FillError(f"syncfs: {os.strerror(e)}")


def _discard(fd: int, e: Entry) -> None:
    """Make the placeholder sparse again (same inode, size and mtime, no data blocks)."""
    try:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, e.size)
        os.utime(fd, (e.mtime, e.mtime))
    except OSError:
        pass


def _hash_zeros(h, n: int) -> None:
    while n > 0:
        k = min(n, len(_ZERO_BLOCK))
        h.update(_ZERO_BLOCK[:k])
        n -= k
