"""One big file served chunk by chunk: fetch on first touch, verify, cache, then serve.

Every chunk a reader gets was checked against its TOC digest by this process first: a
chunk fetched now is decoded and hashed before it is written to the partial file; a chunk
the partial file already holds (another container fetched it) is read back and hashed on
its first use.  A chunk that fails raises `ChunkError`: the FUSE layer answers EIO, which a
mapping turns into SIGBUS.  Nothing unverified is ever returned: every data byte of such
a file lies in a chunk with a digest (`shim.bigfs.is_big`).  Before a complete file becomes
the data layer's object, it is checked against its whole-file digest too (`whole_digest_ok`).
"""

from __future__ import annotations

import bisect
import hashlib
import os
import threading
import time
from collections.abc import Callable

from ..errors import LazyshimError
from ..formats.chunks import decode_chunk
from ..formats.toc import Entry
from ..pacing import RateMeter
from ..store.filler import BlobSource
from ..store.splitread import read_split

SEEK_DATA = getattr(os, "SEEK_DATA", 3)
#: Every chunk request of this process, measured: the background sizes its requests by it.
LINK = RateMeter()


class ChunkError(LazyshimError):
    """A chunk could not be fetched or does not match its digest: the reader gets EIO."""


class BigFile:
    """The chunks of one regular file, cached in its partial file (`fd`, read-write)."""

    def __init__(self, entry: Entry, fmt: str, source: Callable[[], BlobSource], fd: int,
                 on_complete: Callable[[BigFile], None] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.entry = entry
        self.fmt = fmt
        self.fd = fd
        self._source = source
        self._on_complete = on_complete
        self._log = log
        self._starts = [c.file_offset for c in entry.chunks]
        self.verified = bytearray(1 if c.zeros else 0 for c in entry.chunks)  # in this process
        self._missing = self.verified.count(0)
        self._locks = [threading.Lock() for _ in entry.chunks]
        self._counts = threading.Lock()
        self.chunks_fetched = 0
        self.bytes_fetched = 0
        self.completed = False

    def read(self, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the file (short at its end), every chunk verified."""
        end = min(offset + size, self.entry.size)
        if offset >= end:
            return b""
        first = bisect.bisect_right(self._starts, offset) - 1
        last = bisect.bisect_left(self._starts, end)
        for k in range(first, last):
            if not self.verified[k]:
                self._ensure(k)
        return os.pread(self.fd, end - offset, offset)

    def chunk_range(self, offset: int, size: int) -> range:
        """The indices of the chunks a read of [offset, offset+size) touches."""
        end = min(offset + size, self.entry.size)
        if offset >= end:
            return range(0)
        return range(bisect.bisect_right(self._starts, offset) - 1, bisect.bisect_left(self._starts, end))

    def ensure(self, k: int, split: bool = True) -> None:
        """Chunk k verified in the partial file, unasked (a prefetch, the background): exactly
        as a read would, under the same per-chunk lock, so a reader of it waits for this fetch.
        `split=False`: one request, which leaves more of the link to readers' split fetches."""
        if not self.verified[k]:
            self._ensure(k, split)

    def _ensure(self, k: int, split: bool = True) -> None:
        with self._locks[k]:
            if self.verified[k] or self._verified_cached(k):
                return
            t0 = time.monotonic()
            self._verify_and_cache(k, t0, *self._fetch(k, split=split))

    def ensure_paced(self, k: int, have: bytes, piece: int, go_on: Callable[[], bool]) -> bytes | None:
        """Chunk k for the background: its bytes in sequential requests of about `piece`, after
        `have` (what an earlier call fetched of it); between requests `go_on()` may say a reader
        now waits on the link, and the call stops there, returning what it has (pass it back to
        go on).  None once the chunk is verified, by this call or anyone.  A 4 MiB chunk in one
        request would hold the link for a third of a second at 100 Mbit/s, and every miss
        arriving meanwhile would queue behind it; one piece sized by the measured rate
        (`shim.pacing.request_size`) costs it tens of milliseconds at most."""
        if self.verified[k]:
            return None
        with self._locks[k]:
            if self.verified[k] or (not have and self._verified_cached(k)):
                return None
            c = self.entry.chunks[k]
            data = bytearray(have if len(have) <= c.end - c.offset else b"")
            src = self._source()
            t0 = time.monotonic()
            while c.offset + len(data) < c.end:
                if data and not go_on():
                    return bytes(data)
                start = c.offset + len(data)
                data += self._read(src, k, start, min(c.end, start + max(1, piece)))
            self._verify_and_cache(k, t0, bytes(data), self._decode(k, bytes(data)))
        return None

    def _verified_cached(self, k: int) -> bool:
        """Chunk k is in the partial file already (another container fetched it) and verifies."""
        c = self.entry.chunks[k]
        if self._cached(c.file_offset, c.size):
            if _sha256(os.pread(self.fd, c.size, c.file_offset)) == c.digest:
                self._verified(k)
                return True
        return False

    def _verify_and_cache(self, k: int, t0: float, data: bytes, piece: bytes) -> None:
        """Check chunk k's fetched content against its digest, and cache it; under its lock."""
        c = self.entry.chunks[k]
        if len(piece) != c.size or _sha256(piece) != c.digest:
            # A part may have come from an endpoint that lies: once more in one request, and
            # if the source can name that request's endpoint, without it the next time.
            data, piece = self._fetch(k, split=False)
            if len(piece) != c.size or _sha256(piece) != c.digest:
                self._reject_last()
                data, piece = self._fetch(k, split=False)
                if len(piece) != c.size or _sha256(piece) != c.digest:
                    raise ChunkError(f"chunk {k} of {self.entry.name!r} does not match its digest")
        t1 = time.monotonic()
        os.pwrite(self.fd, piece, c.file_offset)
        if self._log is not None:
            self._log(f"chunk {k} of {self.entry.name!r}: {len(data)} bytes fetched in {t1 - t0:.3f} s, "
                      f"verified and cached in {time.monotonic() - t1:.3f} s")
        with self._counts:
            self.chunks_fetched += 1
            self.bytes_fetched += c.end - c.offset
        self._verified(k)

    def _fetch(self, k: int, split: bool) -> tuple[bytes, bytes]:
        """Chunk k's compressed bytes and their decoded content (not verified yet)."""
        c = self.entry.chunks[k]
        if split:
            t0 = time.monotonic()
            try:
                data = read_split(self._source(), c.offset, c.end)
            except Exception as err:  # the source's own errors (network, registry)
                raise ChunkError(f"fetching chunk {k} of {self.entry.name!r}: {err}") from err
            LINK.record(t0, time.monotonic(), len(data))
        else:
            data = self._read(self._source(), k, c.offset, c.end)
        return data, self._decode(k, data)

    def _read(self, src: BlobSource, k: int, start: int, end: int) -> bytes:
        """One range request for chunk k, measured."""
        t0 = time.monotonic()
        try:
            data = src.read_range(start, end)
        except Exception as err:  # the source's own errors (network, registry)
            raise ChunkError(f"fetching chunk {k} of {self.entry.name!r}: {err}") from err
        LINK.record(t0, time.monotonic(), len(data))
        return data

    def _decode(self, k: int, data: bytes) -> bytes:
        """Chunk k's content from its compressed bytes; b"" (which fails verification) if corrupt."""
        c = self.entry.chunks[k]
        try:
            return decode_chunk(self.fmt, data, c.inner_offset, c.size)
        except ValueError:  # FormatError: a corrupt member, as a wrong digest is
            return b""

    def _reject_last(self) -> None:
        """Set aside the endpoint of this thread's last read, where the source has several."""
        src = self._source()
        origin = getattr(src, "last_origin", lambda: None)()
        if origin is not None:
            src.reject(origin)

    def whole_digest_ok(self) -> bool:
        """The complete file against the TOC's whole-file digest (True when it has none).
        Chunk digests cover every byte a reader gets; this one guards the data layer, where
        the object is shared by name with every image that holds the same digest."""
        if not self.entry.digest:
            return True
        h = hashlib.sha256()
        for off in range(0, self.entry.size, 4 << 20):
            h.update(os.pread(self.fd, min(4 << 20, self.entry.size - off), off))
        return "sha256:" + h.hexdigest() == self.entry.digest

    def _cached(self, offset: int, size: int) -> bool:
        """The partial file may hold this chunk (it has data there, not a hole)."""
        try:
            return os.lseek(self.fd, offset, SEEK_DATA) < offset + size
        except OSError:
            return False  # ENXIO: no data after offset

    def _verified(self, k: int) -> None:
        self.verified[k] = 1
        with self._counts:
            self._missing -= 1
            done = self._missing == 0 and not self.completed
            if done:
                self.completed = True
        if done and self._on_complete is not None:
            self._on_complete(self)


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
