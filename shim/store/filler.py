"""Fill placeholder files with their verified content.

A fill fetches the compressed ranges of one file, decodes each chunk, checks it against
its digest and only then writes it in place (same inode: overlayfs and every fd already
open see it) into the placeholder.  The file is marked filled in the layer's byte map only
after its data is on disk, so a crash can cost a refetch but never serve a hole.

Two opens of the same file wait on one fetch (in-process events); two processes filling
the same layer serialise on an flock of the placeholder itself.
"""

from __future__ import annotations

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


class _MemorySource:
    """Blob bytes fetched ahead (one span of a bulk fill)."""

    def __init__(self, start: int, data: bytes) -> None:
        self.start, self.data = start, data

    def read_range(self, start: int, end: int) -> bytes:
        if start < self.start or end > self.start + len(self.data):
            raise FillError(f"range [{start}, {end}) outside the prefetched span")
        return self.data[start - self.start:end - self.start]


def filled_map_path(layer_dir: Path) -> Path:
    return layer_dir / "filled"


def create_filled_map(layer_dir: Path, entries: int, all_filled: bool = False) -> None:
    with open(filled_map_path(layer_dir), "wb") as f:
        f.write((b"\1" if all_filled else b"\0") * max(entries, 1))


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

    @property
    def source(self) -> BlobSource:
        if self._source is None:
            self._source = self._source_factory()
        return self._source

    def is_filled(self, idx: int) -> bool:
        return self.filled[idx] != 0

    def fill(self, idx: int, source: BlobSource | None = None) -> None:
        """Make entry `idx` complete on disk; returns when it is (or raises FillError)."""
        if self.filled[idx]:
            return
        with self._lock:
            ev = self._inflight.get(idx)
            owner = ev is None
            if owner:
                ev = self._inflight[idx] = threading.Event()
        if not owner:
            ev.wait()
            if not self.filled[idx]:
                raise FillError(f"filling {self.meta.toc.entries[idx].name!r} failed")
            return
        try:
            self._fill_locked(idx, source or self.source)
        finally:
            with self._lock:
                del self._inflight[idx]
            ev.set()

    def fill_many(self, indices: list[int], max_span: int = MAX_REQUEST, gap: int = 256 << 10) -> None:
        """Fill many entries with few requests: their compressed ranges are fetched in
        coalesced spans (at most `max_span` bytes each) and each file is then filled, and
        verified, from memory exactly as `fill` would.  A file larger than a span is
        filled on its own."""
        spans: list[tuple[int, int, list[int]]] = []
        for idx in sorted((i for i in indices if not self.filled[i]), key=self._first_offset):
            lo, hi = self._extent(idx)
            if hi <= lo:
                self.fill(idx)  # nothing to fetch (all zeros)
                continue
            if spans and lo <= spans[-1][1] + gap and max(hi, spans[-1][1]) - spans[-1][0] <= max_span:
                s0, s1, members = spans[-1]
                spans[-1] = (s0, max(s1, hi), [*members, idx])
            else:
                spans.append((lo, hi, [idx]))
        for lo, hi, members in spans:
            if hi - lo > max_span:
                for idx in members:
                    self.fill(idx)
                continue
            data = self.source.read_range(lo, hi)
            self.bytes_fetched += len(data)
            mem = _MemorySource(lo, data)
            for idx in members:
                self.fill(idx, mem)

    def _first_offset(self, idx: int) -> int:
        return self._extent(idx)[0]

    def _extent(self, idx: int) -> tuple[int, int]:
        """The [start, end) of the blob bytes entry `idx` needs (0, 0 if none)."""
        cs = [c for c in self.meta.toc.entries[idx].chunks if not c.zeros]
        if not cs:
            return 0, 0
        return min(c.offset for c in cs), max(c.end for c in cs)

    def _fill_locked(self, idx: int, source: BlobSource) -> None:
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
                return  # another process filled it while we waited
            self._write_content(fd, e, source)
            os.fsync(fd)
            os.utime(fd, (e.mtime, e.mtime))  # writing moved mtime; the image's must show
            if restore_mode is not None or os.fstat(fd).st_mode & 0o7777 != e.mode:
                os.fchmod(fd, e.mode)
            self.filled[idx] = 1
            self.files_filled += 1
        except BaseException as err:
            _discard(fd, e)  # verified pieces of a failed file must not linger as data
            if isinstance(err, OSError | FormatError):
                raise FillError(f"filling {e.name!r}: {err}") from err
            raise
        finally:
            os.close(fd)

    def _write_content(self, fd: int, e: Entry, source: BlobSource) -> None:
        whole = hashlib.sha256()
        all_chunk_digests = all(c.digest or c.zeros for c in e.chunks)
        staged: list[tuple[int, bytes]] = []
        for group in _request_groups(e.chunks):
            base = group[0].offset
            data = b""
            if not group[0].zeros:
                data = source.read_range(base, max(c.end for c in group))
                if not isinstance(source, _MemorySource):
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


def _discard(fd: int, e: Entry) -> None:
    """Make the placeholder sparse again (same inode, size and mtime, no data blocks)."""
    try:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, e.size)
        os.utime(fd, (e.mtime, e.mtime))
    except OSError:
        pass


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
