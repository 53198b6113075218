"""zstd:chunked layers: where the TOC is, how to decode it, how to decode one chunk.

A zstd:chunked blob is a sequence of zstd frames that decompresses to the layer's tar;
every file payload (and every chunk of it) starts a new frame.  The TOC ("manifest") is
zstd-compressed JSON stored as the payload of a zstd *skippable* frame after the data, so
plain zstd readers skip it.  Three footer shapes exist in the wild (all are skippable
frames at the very end of the blob, fields little-endian u64):

* current containers/storage (>= 1.50): 64 bytes
  `manifest offset, compressed length, uncompressed length, manifest type (1),
  tar-split offset, compressed length, uncompressed length, magic "GNUlInUx"`;
  annotations `io.github.containers.zstd-chunked.*` incl. `tarsplit-position`.
* old (stargz-snapshotter's zstdchunked writer, containers/storage <= 1.46, e.g. podman
  4.3.1): 40 bytes `offset, compressed length, uncompressed length, type, magic
  "GnUlInUx"`; annotations `io.containers.zstd-chunked.*` (renamed `io.github.` in 1.44).
* interim (containers/storage 1.47-1.49): 56 bytes: the old 40 bytes then 16 zero bytes.

The manifest checksum annotation is the digest of the COMPRESSED manifest.  Pure: bytes
in, objects out.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard

from .toc import MAX_CHUNK_SIZE, Chunk, FormatError, Toc, build_toc, load_toc_document
from .tocstream import PIECE, pieces_of, toc_entries

CHECKSUM_ANNOTATION = "io.github.containers.zstd-chunked.manifest-checksum"
POSITION_ANNOTATION = "io.github.containers.zstd-chunked.manifest-position"
TARSPLIT_POSITION_ANNOTATION = "io.github.containers.zstd-chunked.tarsplit-position"
OLD_CHECKSUM_ANNOTATION = "io.containers.zstd-chunked.manifest-checksum"
OLD_POSITION_ANNOTATION = "io.containers.zstd-chunked.manifest-position"

CURRENT = "current"
INTERIM = "interim"
OLD = "old"

SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"  # 0x184D2A50 LE: the first skippable-frame magic
SKIPPABLE_HEADER = 8
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAGIC = b"GNUlInUx"
OLD_MAGIC = b"GnUlInUx"
FOOTER_SIZE = 64
INTERIM_FOOTER_SIZE = 56
OLD_FOOTER_SIZE = 40
#: Fetch this many tail bytes: the largest footer plus its skippable-frame header.
FOOTER_FETCH_SIZE = FOOTER_SIZE + SKIPPABLE_HEADER
MANIFEST_TYPE_CRFS = 1

MAX_MANIFEST_COMPRESSED = 64 << 20
MAX_MANIFEST_UNCOMPRESSED = 256 << 20
MAX_TARSPLIT = 1 << 30

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_NUM = r"(0|[1-9][0-9]{0,18})"


@dataclass(frozen=True, slots=True)
class TocLocation:
    """Where the compressed manifest (TOC) of a zstd:chunked blob lies.

    `offset` is the first byte of the compressed manifest itself (after its
    skippable-frame header), `length` its compressed size.  `checksum` (sha256 of the
    compressed bytes) is known only from annotations.  The tar-split fields are 0 when
    absent.  `footer_size` is the size of the footer frame payload when the location came
    from the footer, else 0.
    """

    offset: int
    length: int
    uncompressed_length: int
    checksum: str | None
    generation: str  # CURRENT, INTERIM or OLD
    tarsplit_offset: int = 0
    tarsplit_length: int = 0
    tarsplit_uncompressed_length: int = 0
    footer_size: int = 0

    @property
    def data_end(self) -> int:
        """First byte after the file data: where the manifest's skippable frame starts."""
        return self.offset - SKIPPABLE_HEADER


def _check(offset: int, length: int, ulen: int, typ: int) -> None:
    if typ != MANIFEST_TYPE_CRFS:
        raise FormatError(f"unsupported zstd:chunked manifest type {typ}")
    if offset < SKIPPABLE_HEADER:
        raise FormatError(f"zstd:chunked manifest offset {offset} leaves no room for its frame header")
    if not 0 < length <= MAX_MANIFEST_COMPRESSED:
        raise FormatError(f"zstd:chunked manifest is {length} bytes compressed (too large)")
    if not 0 < ulen <= MAX_MANIFEST_UNCOMPRESSED:
        raise FormatError(f"zstd:chunked manifest is {ulen} bytes (limit {MAX_MANIFEST_UNCOMPRESSED})")


def _check_tarsplit(offset: int, length: int, ulen: int) -> None:
    if (offset or length or ulen) and not (
        offset >= SKIPPABLE_HEADER and 0 < length <= MAX_TARSPLIT and 0 < ulen <= MAX_TARSPLIT
    ):
        raise FormatError(f"bad zstd:chunked tar-split position {offset}:{length}:{ulen}")


def manifest_location(annotations: dict[str, str]) -> TocLocation | None:
    """The manifest location from layer annotations; None if the layer is not zstd:chunked.

    The current `io.github.containers.*` keys win over the old `io.containers.*` ones.
    A present but malformed annotation is a FormatError, never a silent fallback.
    """
    if not isinstance(annotations, dict):
        return None
    if POSITION_ANNOTATION in annotations:
        gen, pos_key, sum_key = CURRENT, POSITION_ANNOTATION, CHECKSUM_ANNOTATION
    elif OLD_POSITION_ANNOTATION in annotations:
        gen, pos_key, sum_key = OLD, OLD_POSITION_ANNOTATION, OLD_CHECKSUM_ANNOTATION
    else:
        return None
    pos = annotations[pos_key]
    m = re.fullmatch(":".join([_NUM] * 4), pos) if isinstance(pos, str) else None
    if m is None:
        raise FormatError(f"bad {pos_key} annotation {str(pos)[:80]!r}")
    offset, length, ulen, typ = (int(g) for g in m.groups())
    _check(offset, length, ulen, typ)
    checksum = annotations.get(sum_key)
    if checksum is not None and (not isinstance(checksum, str) or not _DIGEST_RE.match(checksum)):
        raise FormatError(f"bad {sum_key} annotation {str(checksum)[:80]!r}")
    ts = (0, 0, 0)
    if gen == CURRENT and TARSPLIT_POSITION_ANNOTATION in annotations:
        raw = annotations[TARSPLIT_POSITION_ANNOTATION]
        m = re.fullmatch(":".join([_NUM] * 3), raw) if isinstance(raw, str) else None
        if m is None:
            raise FormatError(f"bad {TARSPLIT_POSITION_ANNOTATION} annotation {str(raw)[:80]!r}")
        ts = tuple(int(g) for g in m.groups())
        _check_tarsplit(*ts)
    return TocLocation(offset, length, ulen, checksum, gen, *ts)


def parse_footer(tail: bytes, blob_size: int | None = None) -> TocLocation:
    """The manifest location from the last bytes of a blob (fetch FOOTER_FETCH_SIZE).

    With at least 8 more bytes than the footer, the skippable-frame header around the
    footer is checked too.  With `blob_size`, the manifest must lie before the footer.
    """
    tail = bytes(tail)
    if len(tail) >= FOOTER_SIZE and tail[-8:] == MAGIC:
        size, gen = FOOTER_SIZE, CURRENT
        offset, length, ulen, typ, ts_off, ts_len, ts_ulen = struct.unpack("<7Q", tail[-64:-8])
        _check_tarsplit(ts_off, ts_len, ts_ulen)
    elif len(tail) >= INTERIM_FOOTER_SIZE and tail[-24:-16] == OLD_MAGIC and tail[-16:] == bytes(16):
        size, gen = INTERIM_FOOTER_SIZE, INTERIM
        offset, length, ulen, typ = struct.unpack("<4Q", tail[-56:-24])
        ts_off = ts_len = ts_ulen = 0
    elif len(tail) >= OLD_FOOTER_SIZE and tail[-8:] == OLD_MAGIC:
        size, gen = OLD_FOOTER_SIZE, OLD
        offset, length, ulen, typ = struct.unpack("<4Q", tail[-40:-8])
        ts_off = ts_len = ts_ulen = 0
    else:
        raise FormatError("not a zstd:chunked layer (no zstd:chunked footer)")
    if len(tail) >= size + SKIPPABLE_HEADER:
        hdr = tail[-size - SKIPPABLE_HEADER : -size]
        if hdr != SKIPPABLE_MAGIC + struct.pack("<I", size):
            raise FormatError("zstd:chunked footer is not in a skippable frame")
    _check(offset, length, ulen, typ)
    if blob_size is not None:
        limit = blob_size - size - SKIPPABLE_HEADER
        if offset + length > limit or (ts_off and ts_off + ts_len > limit):
            raise FormatError(f"zstd:chunked manifest {offset}+{length} outside the blob ({blob_size} bytes)")
    return TocLocation(offset, length, ulen, None, gen, ts_off, ts_len, ts_ulen, footer_size=size)


def manifest_checksum(compressed: bytes | memoryview) -> str:
    return "sha256:" + hashlib.sha256(compressed).hexdigest()


def zstd_pieces(data: bytes | memoryview, limit: int, piece: int = PIECE) -> Iterator[bytes]:
    """Decompress concatenated zstd frames (skippable ones are skipped) in pieces, at most
    `limit` bytes in all; FormatError (before they are made) if there would be more."""
    total = 0
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        with reader:
            while True:
                b = reader.read(min(limit + 1 - total, piece))
                if not b:
                    return
                total += len(b)
                if total > limit:
                    raise FormatError(f"zstd data inflates beyond {limit} bytes")
                yield b
    except zstandard.ZstdError as e:
        raise FormatError(f"corrupt zstd data: {str(e)[:100]}") from e


def zstd_decompress_bounded(data: bytes, limit: int) -> bytes:
    """Decompress concatenated zstd frames (skippable ones are skipped), at most `limit`
    bytes; FormatError if there would be more."""
    return b"".join(zstd_pieces(data, limit))


def unwrap_skippable(data: bytes) -> bytes:
    """The payload of the zstd skippable frame at the start of `data`."""
    if len(data) < SKIPPABLE_HEADER or data[:4] != SKIPPABLE_MAGIC:
        raise FormatError("not a zstd skippable frame")
    (n,) = struct.unpack("<I", data[4:8])
    if len(data) < SKIPPABLE_HEADER + n:
        raise FormatError("truncated zstd skippable frame")
    return bytes(data[SKIPPABLE_HEADER : SKIPPABLE_HEADER + n])


def decode_manifest(blob_region: bytes, loc: TocLocation) -> bytes:
    """The manifest (TOC JSON) bytes from the blob bytes at `loc`.

    `blob_region` starts either at `loc.offset` or 8 bytes earlier at the skippable-frame
    header (which is then checked); bytes after `loc.length` are ignored.  The checksum
    of the compressed bytes is verified when `loc` carries one; the output must be exactly
    `loc.uncompressed_length` bytes and never more than MAX_MANIFEST_UNCOMPRESSED.
    """
    return b"".join(manifest_pieces(blob_region, loc))


def manifest_pieces(blob_region: bytes | memoryview, loc: TocLocation) -> Iterator[bytes]:
    """`decode_manifest` in pieces: never the whole manifest in memory at once."""
    region = memoryview(blob_region)
    if region[:4] == SKIPPABLE_MAGIC:
        if len(region) < SKIPPABLE_HEADER or struct.unpack("<I", region[4:8])[0] != loc.length:
            raise FormatError("zstd:chunked manifest frame header does not match its position")
        region = region[SKIPPABLE_HEADER:]
    if len(region) < loc.length:
        raise FormatError(f"zstd:chunked manifest truncated ({len(region)} of {loc.length} bytes)")
    compressed = region[: loc.length]
    if loc.checksum is not None and manifest_checksum(compressed) != loc.checksum:
        raise FormatError("zstd:chunked manifest checksum mismatch")
    if not 0 < loc.uncompressed_length <= MAX_MANIFEST_UNCOMPRESSED:
        raise FormatError(f"zstd:chunked manifest size {loc.uncompressed_length} out of bounds")
    if compressed[:4] != ZSTD_MAGIC:
        raise FormatError("zstd:chunked manifest is not a zstd frame")
    n = 0
    for piece in zstd_pieces(compressed, loc.uncompressed_length):
        n += len(piece)
        yield piece
    if n != loc.uncompressed_length:
        raise FormatError(f"zstd:chunked manifest is {n} bytes, its position says {loc.uncompressed_length}")


def read_toc(blob_region: bytes | memoryview, loc: TocLocation) -> Toc:
    """The layer's `Toc` straight from the blob bytes at `loc` (checked as `decode_manifest`
    does), parsed as its pieces are inflated: memory stays small whatever the manifest holds."""
    return build_toc(toc_entries(manifest_pieces(blob_region, loc), "zstd:chunked manifest"), loc.data_end)


def parse_toc(toc_json: bytes, data_end: int) -> Toc:
    """Parse zstd:chunked manifest JSON into a validated `Toc`; data ends at `data_end`
    (`TocLocation.data_end`)."""
    return build_toc(toc_entries(pieces_of(toc_json), "zstd:chunked manifest"), data_end)


def tarsplit_digest(toc_json: bytes) -> str | None:
    """The manifest's `tarSplitDigest` (sha256 of the compressed tar-split), if any."""
    v = _load(toc_json).get("tarSplitDigest")
    if v in (None, ""):
        return None
    if not isinstance(v, str) or not _DIGEST_RE.match(v):
        raise FormatError(f"bad tarSplitDigest {str(v)[:80]!r}")
    return v


def _load(toc_json: bytes) -> dict:
    return load_toc_document(toc_json, "zstd:chunked manifest")


def decode_frame(data: bytes, inner_offset: int, size: int) -> bytes:
    """Decompress the zstd frame(s) of one chunk; return `size` bytes from `inner_offset`.

    At most `inner_offset + size` bytes are decompressed, whatever the frames hold.
    """
    if not 0 <= inner_offset <= MAX_CHUNK_SIZE or not 0 <= size <= MAX_CHUNK_SIZE:
        raise FormatError(f"chunk bounds out of range ({inner_offset}, {size})")
    limit = inner_offset + size
    if limit == 0:
        return b""
    out = bytearray()
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(bytes(data), read_across_frames=True)
        with reader:
            while len(out) < limit:
                b = reader.read(limit - len(out))
                if not b:
                    break
                out += b
    except zstandard.ZstdError as e:
        raise FormatError(f"corrupt zstd chunk: {str(e)[:100]}") from e
    if len(out) < limit:
        raise FormatError("zstd chunk shorter than the TOC says")
    return bytes(out[inner_offset:limit])


def decode_chunk(chunk: Chunk, data: bytes) -> bytes:
    """The file bytes of `chunk` from its compressed range (zeros chunks need no data)."""
    if chunk.zeros:
        return bytes(chunk.size)
    return decode_frame(data, chunk.inner_offset, chunk.size)
