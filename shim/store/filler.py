"""Fill placeholder files with their verified content.

A fill fetches the compressed ranges of one file, decodes each chunk, checks it against
its digest and only then writes it in place (same inode: overlayfs and every fd already
open see it) into the placeholder.  The file is marked filled in the layer's byte map only
after its data is on disk, so a crash can cost a refetch but never serve a hole.

Two opens of the same file wait on one fetch (in-process events); two processes filling
the same layer serialise on an flock of the placeholder itself.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import mmap
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ..errors import LazyshimError
from ..formats.chunks import decode_chunk
from ..formats.toc import Chunk, Entry, FormatError
from .metadata import LayerMeta

#: One range request fetches at most this much, so a huge file streams in pieces.
MAX_REQUEST = 32 << 20
_ZERO_BLOCK = bytes(1 << 20)


class FillError(LazyshimError):
    """A file could not be filled (fetch failed, digest mismatch): the opener gets EIO."""


class BlobSource(Protocol):
    """Where a layer's compressed bytes come from (a registry, a local blob file)."""

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


def filled_map_path(layer_dir: Path) -> Path:
    return layer_dir / "filled"


COMPLETE_MARK = "complete"


def create_filled_map(layer_dir: Path, entries: int, all_filled: bool = False) -> None:
    with open(filled_map_path(layer_dir), "wb") as f:
        f.write((b"\1" if all_filled else b"\0") * max(entries, 1))
    if all_filled:
        mark_complete(layer_dir)


def mark_complete(layer_dir: Path) -> None:
    """Record that every file of the layer is on disk (after the data was made durable), so
    a runtime can start containers of it without any supervisor: native speed."""
    (layer_dir / COMPLETE_MARK).touch()


def is_complete(layer_dir: Path) -> bool:
    return (layer_dir / COMPLETE_MARK).exists()


class LayerFiller:
    """Fills the files of one layer's placeholder tree on demand."""

    def __init__(self, layer_dir: Path, meta: LayerMeta, source_factory: Callable[[], BlobSource]) -> None:
        self.dir = layer_dir
        self.tree = layer_dir / "tree"
        self.meta = meta
        self._source_factory = source_factory
        self._source: BlobSource | None = None
        fd = os.open(filled_map_path(layer_dir), os.O_RDWR | os.O_CLOEXEC)
        try:
            self.filled = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self._lock = threading.Lock()
        self._inflight: dict[int, threading.Event] = {}
        self.bytes_fetched = 0
        self.files_filled = 0
        self.errors: list[str] = []  # the last prefetch's failures
        if not is_complete(layer_dir):
            self._check_marks()
        self.unfilled = self.count_unfilled()
        if not self.unfilled:
            self.mark_complete()

    def _check_marks(self) -> None:
        """Drop marks whose data a crash may have lost (v1's data is durable before its mark)."""

    def count_unfilled(self) -> int:
        """Regular files with data not yet on disk (fills by other processes included)."""
        return sum(1 for i, e in enumerate(self.meta.toc.entries)
                   if e.size and e.type == "reg" and not self.is_filled(i))

    def is_filled(self, idx: int) -> bool:
        """Entry idx's data is in place (the byte map is shared by every process of the store)."""
        return bool(self.filled[idx])

    def mark_complete(self) -> None:
        mark_complete(self.dir)

    @property
    def source(self) -> BlobSource:
        if self._source is None:
            self._source = self._source_factory()
        return self._source

    def fill(self, idx: int) -> None:
        """Make entry `idx` complete on disk; returns when it is (or raises FillError)."""
        self._fill(idx, None, wait=True)

    def _fill(self, idx: int, fetched: tuple[int, bytes] | None, wait: bool) -> None:
        if self.is_filled(idx):
            return
        with self._lock:
            ev = self._inflight.get(idx)
            owner = ev is None
            if owner:
                ev = self._inflight[idx] = threading.Event()
        if not owner:
            if not wait:
                return  # someone else is on it
            ev.wait()
            if not self.is_filled(idx):
                raise FillError(f"filling {self.meta.toc.entries[idx].name!r} failed")
            return
        try:
            self._fill_locked(idx, fetched)
        finally:
            with self._lock:
                del self._inflight[idx]
            ev.set()

    def prefetch(self, indices: list[int], pause: Callable[[], None], gap: int = 64 << 10,
                 max_request: int = 1 << 20) -> int:
        """Fill many files with few range requests (runs of adjacent payloads).

        `pause` is called before every request and may block: on-demand fills come first.
        Returns the number of files that failed (they stay unfilled; an open retries them).
        """
        runs: list[list[tuple[int, int, int]]] = []
        spans = sorted((_span(self.meta.toc.entries[i]) + (i,) for i in indices
                        if self.meta.toc.entries[i].chunks and not self.is_filled(i)), key=lambda t: t[0])
        for start, end, i in spans:
            if end <= start:
                continue
            if runs and start <= runs[-1][-1][1] + gap and end - runs[-1][0][0] <= max_request:
                runs[-1].append((start, end, i))
            else:
                runs.append([(start, end, i)])
        self.errors = []
        for run in runs:
            todo = [t for t in run if not self.is_filled(t[2])]
            if not todo:
                continue
            pause()
            start, end = todo[0][0], max(t[1] for t in todo)
            try:
                data = self._read(self.meta.toc.entries[todo[0][2]], start, end)
            except FillError as err:
                self.errors.append(str(err))
                continue
            self.bytes_fetched += len(data)
            self._fill_run([t[2] for t in todo], (start, data))
        return len(self.errors)

    def fill_many(self, indices: list[int], max_request: int = MAX_REQUEST) -> None:
        """Fill many files now, in few requests; raises FillError naming the first failure."""
        if self.prefetch(indices, lambda: None, max_request=max_request):
            raise FillError(f"{len(self.errors)} files failed; first: {self.errors[0]}")

    def _fill_run(self, indices: list[int], fetched: tuple[int, bytes]) -> None:
        """Write a run of files, make them durable with one syncfs, then mark them filled.

        One sync per run instead of one fsync per file; the files stay claimed (in-process
        waiters keep waiting) until they are marked."""
        claimed: list[tuple[int, threading.Event]] = []
        with self._lock:
            for i in indices:
                if not self.filled[i] and i not in self._inflight:
                    ev = self._inflight[i] = threading.Event()
                    claimed.append((i, ev))
        written = []
        try:
            for i, _ in claimed:
                try:
                    if self._fill_locked(i, fetched, durable=False):
                        written.append(i)
                except FillError as err:
                    self.errors.append(str(err))
            if written:
                self._commit_run(written)
        finally:
            with self._lock:
                for i, ev in claimed:
                    del self._inflight[i]
                    ev.set()

    def _commit_run(self, written: list[int]) -> None:
        """Make a run of written files durable with one syncfs, then mark them filled."""
        sync_dir(self.tree)
        self._mark_filled(written)

    def _mark_filled(self, indices: list[int]) -> None:
        for i in indices:
            self.filled[i] = 1
        self.files_filled += len(indices)
        self.unfilled -= len(indices)
        if self.unfilled <= 0:
            self.unfilled = self.count_unfilled()  # shared objects may have filled others
            if not self.unfilled:
                self.mark_complete()

    def _fill_locked(self, idx: int, fetched: tuple[int, bytes] | None = None, durable: bool = True) -> bool:
        """Write entry idx; with `durable`, fsync and mark it filled.  False if another
        process had already filled it."""
        e = self.meta.toc.entries[idx]
        path = self.tree / e.name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            restore_mode = None
        except PermissionError:
            # Rootless stores own the files with their image modes (e.g. 0444).
            os.chmod(path, e.mode | 0o200, follow_symlinks=False)
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            restore_mode = e.mode
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self.filled[idx]:
                return False  # another process filled it while we waited
            self._write_content(fd, e, fetched)
            os.utime(fd, (e.mtime, e.mtime))  # writing moved mtime; the image's must show
            if restore_mode is not None or os.fstat(fd).st_mode & 0o7777 != e.mode:
                os.fchmod(fd, e.mode)
            if durable:
                os.fsync(fd)  # data on disk before the mark: a crash never serves a hole
                self._mark_filled([idx])
            return True
        except BaseException as err:
            _discard(fd, e)  # verified pieces of a failed file must not linger as data
            if isinstance(err, OSError | FormatError):
                raise FillError(f"filling {e.name!r}: {err}") from err
            raise
        finally:
            os.close(fd)

    def _read(self, e: Entry, start: int, end: int) -> bytes:
        try:
            return self.source.read_range(start, end)
        except FillError:
            raise
        except Exception as err:  # the source's own errors (network, registry) end this fill
            raise FillError(f"fetching {e.name!r}: {err}") from err

    def _write_content(self, fd: int, e: Entry, fetched: tuple[int, bytes] | None) -> None:
        whole = hashlib.sha256()
        all_chunk_digests = all(c.digest or c.zeros for c in e.chunks)
        staged: list[tuple[int, bytes]] = []
        for group in _request_groups(e.chunks):
            base = group[0].offset
            data = b""
            if not group[0].zeros:
                end = max(c.end for c in group)
                if fetched is not None and fetched[0] <= base and end <= fetched[0] + len(fetched[1]):
                    data = fetched[1][base - fetched[0]: end - fetched[0]]  # already downloaded
                else:
                    data = self._read(e, base, end)
                    self.bytes_fetched += len(data)
            for c in group:
                if c.zeros:
                    piece = None
                    _hash_zeros(whole, c.size)
                else:
                    piece = decode_chunk(self.meta.format, data[c.offset - base: c.end - base],
                                         c.inner_offset, c.size)
                    if c.digest and "sha256:" + hashlib.sha256(piece).hexdigest() != c.digest:
                        raise FillError(f"{e.name!r}: chunk at {c.file_offset} does not match its digest")
                    whole.update(piece)
                if piece is None:
                    continue
                if all_chunk_digests:
                    os.pwrite(fd, piece, c.file_offset)
                else:
                    staged.append((c.file_offset, piece))
        if e.digest and "sha256:" + whole.hexdigest() != e.digest:
            raise FillError(f"{e.name!r}: content does not match its digest")
        for off, piece in staged:  # verified as a whole, only now written
            os.pwrite(fd, piece, off)


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


def _span(e: Entry) -> tuple[int, int]:
    """The compressed byte range holding all of a file's data chunks."""
    data = [c for c in e.chunks if not c.zeros]
    if not data:
        return 0, 0
    return min(c.offset for c in data), max(c.end for c in data)


def _request_groups(chunks: list[Chunk]) -> list[list[Chunk]]:
    """Chunks in runs of adjacent compressed ranges, each run one range request.

    A zeros chunk has no bytes in the blob and forms a group of its own.
    """
    groups: list[list[Chunk]] = []
    cur: list[Chunk] = []
    for c in chunks:
        if c.zeros:
            if cur:
                groups.append(cur)
                cur = []
            groups.append([c])
            continue
        if cur and (c.offset < cur[0].offset or c.offset > cur[-1].end or c.end - cur[0].offset > MAX_REQUEST):
            groups.append(cur)
            cur = []
        cur.append(c)
    if cur:
        groups.append(cur)
    return groups


def _hash_zeros(h, n: int) -> None:
    while n > 0:
        k = min(n, len(_ZERO_BLOCK))
        h.update(_ZERO_BLOCK[:k])
        n -= k
