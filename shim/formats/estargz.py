"""eStargz (and legacy stargz) layers: footer, TOC, and chunk decoding.

An eStargz blob is a sequence of gzip members; every regular file's payload starts a new
member, so any file can be decompressed from a byte range alone.  The TOC is the last tar
entry (`stargz.index.json`) and a fixed-size footer at the very end of the blob points at
it.  Pure: bytes in, objects out.
"""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
import zlib
from collections.abc import Iterator

from .toc import MAX_CHUNK_SIZE, TOC_TAR_NAME, FormatError, Toc, build_toc
from .tocstream import PIECE, pieces_of, toc_entries

FOOTER_SIZE = 51
LEGACY_FOOTER_SIZE = 47
TOC_DIGEST_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE_ANNOTATION = "io.containers.estargz.uncompressed-size"

#: Refuse TOCs larger than this, compressed or not, before reading them whole.
MAX_TOC_COMPRESSED = 64 << 20
MAX_TOC_UNCOMPRESSED = 256 << 20


def parse_footer(tail: bytes) -> tuple[int, int]:
    """Return (toc_offset, footer_size) from the last bytes of a blob (at least 51).

    Tries the eStargz footer first, then the 47-byte legacy stargz one.
    """
    if len(tail) >= FOOTER_SIZE:
        off = _estargz_footer(tail[-FOOTER_SIZE:])
        if off is not None:
            return off, FOOTER_SIZE
    if len(tail) >= LEGACY_FOOTER_SIZE:
        off = _legacy_footer(tail[-LEGACY_FOOTER_SIZE:])
        if off is not None:
            return off, LEGACY_FOOTER_SIZE
    raise FormatError("not an eStargz layer (no stargz footer)")


def _estargz_footer(f: bytes) -> int | None:
    # gzip header with FEXTRA: 1f 8b 08 04, mtime(4) xfl os, XLEN=26, subfield 'S''G' len 22
    if f[:4] != b"\x1f\x8b\x08\x04" or f[10:12] != b"\x1a\x00" or f[12:14] != b"SG":
        return None
    if f[14:16] != b"\x16\x00" or f[32:38] != b"STARGZ":
        return None
    return _hex_offset(f[16:32])


def _legacy_footer(f: bytes) -> int | None:
    # legacy stargz: gzip header with FEXTRA of 22 bytes "%016xSTARGZ" (no subfield id)
    if f[:4] != b"\x1f\x8b\x08\x04" or f[10:12] != b"\x16\x00" or f[28:34] != b"STARGZ":
        return None
    return _hex_offset(f[12:28])


def _hex_offset(b: bytes) -> int | None:
    try:
        s = b.decode("ascii")
        return int(s, 16) if all(c in "0123456789abcdefABCDEF" for c in s) else None
    except UnicodeDecodeError:
        return None


def toc_range(blob_size: int, toc_offset: int, footer_size: int) -> tuple[int, int]:
    """The [start, end) byte range of the compressed TOC, bounds-checked."""
    end = blob_size - footer_size
    if not 0 <= toc_offset < end:
        raise FormatError(f"TOC offset {toc_offset} outside the blob ({blob_size} bytes)")
    if end - toc_offset > MAX_TOC_COMPRESSED:
        raise FormatError(f"TOC is {end - toc_offset} bytes compressed (limit {MAX_TOC_COMPRESSED})")
    return toc_offset, end


def gunzip_pieces(data: bytes | memoryview, limit: int, piece: int = PIECE) -> Iterator[bytes]:
    """Decompress concatenated gzip members in pieces of at most `piece` bytes, refusing
    output beyond `limit` bytes in all (before it is made, not after)."""
    total = 0
    while data:
        d = zlib.decompressobj(wbits=31)
        buf = data
        while not d.eof:
            try:
                out = d.decompress(buf, piece)
            except zlib.error as e:
                raise FormatError(f"corrupt gzip data: {e}") from e
            total += len(out)
            if total > limit:
                raise FormatError(f"gzip data inflates beyond {limit} bytes")
            if out:
                yield out
            buf = d.unconsumed_tail
            if not buf and not out and not d.eof:
                raise FormatError("truncated gzip data")
        data = d.unused_data


def gunzip_bounded(data: bytes, limit: int) -> bytes:
    """Decompress concatenated gzip members, refusing output beyond `limit` bytes."""
    return b"".join(gunzip_pieces(data, limit))


class _PieceReader(io.RawIOBase):
    """A read-only file over pieces of bytes (what tarfile's stream mode reads from)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._cur = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._cur:
            nxt = next(self._pieces, None)
            if nxt is None:
                return 0
            self._cur = memoryview(nxt)
        n = min(len(b), len(self._cur))
        b[:n] = self._cur[:n]
        self._cur = self._cur[n:]
        return n

    def drain(self) -> None:
        """Read the rest (each piece still bounded by its producer)."""
        self._cur = memoryview(b"")
        for _ in self._pieces:
            pass


def toc_json_pieces(region: bytes | memoryview) -> Iterator[bytes]:
    """The raw TOC JSON of the compressed TOC region (a gzipped tar entry), in pieces: the
    region is never inflated whole, and never beyond the TOC size limit."""
    reader = _PieceReader(gunzip_pieces(region, MAX_TOC_UNCOMPRESSED + 64 * 1024))
    try:
        tf = tarfile.open(fileobj=reader, mode="r|")
        # The stargz writer makes the TOC the first (and only) entry of its region.
        m = tf.next()
        if m is None or m.name != TOC_TAR_NAME or not m.isreg():
            reader.drain()  # a bomb is reported as one, whatever its first bytes are
            raise FormatError(f"no {TOC_TAR_NAME} in the TOC region")
        if m.size > MAX_TOC_UNCOMPRESSED:
            raise FormatError(f"TOC inflates beyond {MAX_TOC_UNCOMPRESSED} bytes (its tar header says {m.size})")
        f = tf.extractfile(m)
        if f is None:
            raise FormatError(f"no {TOC_TAR_NAME} in the TOC region")
        left = m.size
        while left:
            data = f.read(min(PIECE, left))
            if not data:
                raise FormatError("truncated TOC tar entry")
            left -= len(data)
            yield data
        reader.drain()
    except FormatError:
        raise
    except (tarfile.TarError, ValueError, EOFError, OverflowError, UnicodeError) as e:
        raise FormatError(f"corrupt TOC tar: {str(e)[:100]}") from e


def toc_json_from_region(region: bytes) -> bytes:
    """Extract the raw TOC JSON from the compressed TOC region (a gzipped tar entry)."""
    return b"".join(toc_json_pieces(region))


def toc_digest(toc_json: bytes) -> str:
    """The eStargz TOC digest (annotation `containerd.io/snapshot/stargz/toc.digest`)."""
    return "sha256:" + hashlib.sha256(toc_json).hexdigest()


def parse_toc(toc_json: bytes, toc_offset: int) -> Toc:
    """Parse eStargz TOC JSON into a validated `Toc`; payloads end at `toc_offset`."""
    return build_toc(toc_entries(pieces_of(toc_json), "TOC"), toc_offset)


def read_toc(region: bytes | memoryview, toc_offset: int, want_digest: str) -> Toc:
    """The layer's `Toc` straight from its compressed TOC region, checked against the TOC
    digest of the (verified) manifest: inflated, hashed and parsed in one pass of pieces,
    so memory stays small whatever the region holds.  A TOC that does not match its digest
    is reported as such even when it does not parse either."""
    h = hashlib.sha256()
    state = {"read": False, "broken": False}

    def hashed() -> Iterator[bytes]:
        try:
            for piece in toc_json_pieces(region):
                h.update(piece)
                yield piece
        except FormatError:
            state["broken"] = True
            raise
        state["read"] = True

    pieces = hashed()
    try:
        toc = build_toc(toc_entries(pieces, "TOC"), toc_offset)
    except FormatError as e:
        if state["broken"]:
            raise
        for _ in pieces:  # to the end, for the digest (bounded like the parse)
            pass
        if "sha256:" + h.hexdigest() != want_digest:
            raise _digest_mismatch(h, want_digest) from e
        raise
    for _ in pieces:
        pass
    if "sha256:" + h.hexdigest() != want_digest:
        raise _digest_mismatch(h, want_digest)
    return toc


def _digest_mismatch(h, want: str) -> FormatError:
    got = "sha256:" + h.hexdigest()
    return FormatError(f"TOC digest {got[:19]} does not match the manifest's {want[:19]}")


def decode_member(data: bytes, inner_offset: int, size: int) -> bytes:
    """Decompress one gzip member and return `size` bytes from `inner_offset`.

    Only `inner_offset + size` bytes are ever inflated, whatever the member holds.
    """
    if not 0 <= inner_offset <= MAX_CHUNK_SIZE or not 0 <= size <= MAX_CHUNK_SIZE:
        raise FormatError(f"chunk bounds out of range ({inner_offset}, {size})")
    limit = inner_offset + size
    if limit == 0:
        return b""  # zlib treats a max_length of 0 as "no limit"
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(data, limit)
    except zlib.error as e:
        raise FormatError(f"corrupt gzip chunk: {e}") from e
    if len(out) < limit:
        raise FormatError("gzip chunk shorter than the TOC says")
    return out[inner_offset:limit]


def footer_bytes(toc_offset: int) -> bytes:
    """The 51-byte eStargz footer for a TOC at `toc_offset` (used by the converter)."""
    extra = b"SG" + struct.pack("<H", 22) + (b"%016x" % toc_offset) + b"STARGZ"
    header = b"\x1f\x8b\x08\x04" + b"\x00\x00\x00\x00" + b"\x00\xff" + struct.pack("<H", len(extra)) + extra
    # an empty deflate stream + crc32 0 + isize 0
    return header + b"\x01\x00\x00\xff\xff" + b"\x00" * 8
