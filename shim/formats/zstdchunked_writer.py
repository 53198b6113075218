"""A small zstd:chunked writer (the CURRENT containers/storage generation).

Layout, as containers/storage's compressor writes it: tar headers (with the previous
entry's padding in front) go into a zstd frame; every file payload and every chunk of it
is a frame of its own; the tar end-of-archive is the last data frame.  Then come three
skippable frames: the zstd-compressed manifest (TOC JSON), the zstd-compressed tar-split
(JSON lines, vbatts/tar-split format) and the 64-byte footer.  The annotations returned
are the ones the layer descriptor must carry.  Chunks here are fixed-size pieces (the
real writer cuts at a rolling checksum; readers must not care); an all-zero piece gets
`chunkType: "zeros"`, and, like the real writer, still has its (tiny) frame.

Pure: bytes in, bytes out.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import tarfile
from collections.abc import Iterable
from typing import NamedTuple

import zstandard

from .estargz_writer import (
    TAR_TRAILER,
    pax_xattrs,
    prepare_entries,
    rfc3339,
    sha256_digest,
    tar_header,
    tar_padding,
)
from .zstdchunked import (
    CHECKSUM_ANNOTATION,
    MAGIC,
    MANIFEST_TYPE_CRFS,
    POSITION_ANNOTATION,
    SKIPPABLE_HEADER,
    SKIPPABLE_MAGIC,
    TARSPLIT_POSITION_ANNOTATION,
)

DEFAULT_CHUNK_SIZE = 4 << 20
_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


class ZstdChunkedLayer(NamedTuple):
    blob: bytes
    annotations: dict[str, str]  # manifest-checksum, manifest-position, tarsplit-position
    toc_json: bytes
    diff_id: str
    uncompressed_size: int


def skippable_frame(payload: bytes) -> bytes:
    return SKIPPABLE_MAGIC + struct.pack("<I", len(payload)) + payload


def footer(
    offset: int, length: int, ulen: int, ts_offset: int, ts_length: int, ts_ulen: int
) -> bytes:
    """The 64-byte footer payload (wrap it in a skippable frame)."""
    return struct.pack("<7Q", offset, length, ulen, MANIFEST_TYPE_CRFS, ts_offset, ts_length, ts_ulen) + MAGIC


def _crc64_table() -> list[int]:
    poly = 0xD800000000000000  # ISO 3309, reversed, as Go's hash/crc64.ISO
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC64 = _crc64_table()


def crc64_iso(data: bytes) -> bytes:
    """Go's crc64.New(crc64.MakeTable(crc64.ISO)).Sum(nil): 8 bytes, big-endian."""
    crc = 0xFFFFFFFFFFFFFFFF
    t = _CRC64
    for b in data:
        crc = t[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return struct.pack(">Q", crc ^ 0xFFFFFFFFFFFFFFFF)


def manifest_entry(ti: tarfile.TarInfo) -> dict:
    """A FileMetadata object as containers/storage derives it from the tar header."""
    typ = _TYPES[ti.type]
    name = ti.name + "/" if typ == "dir" and not ti.name.endswith("/") else ti.name
    e: dict = {"type": typ, "name": name}
    if ti.linkname:
        e["linkName"] = ti.linkname
    if ti.mode & 0o7777:
        e["mode"] = ti.mode & 0o7777
    if ti.size:
        e["size"] = ti.size
    if ti.uid:
        e["uid"] = ti.uid
    if ti.gid:
        e["gid"] = ti.gid
    e["modtime"] = rfc3339(int(ti.mtime))
    if ti.devmajor and typ in ("char", "block"):
        e["devMajor"] = ti.devmajor
    if ti.devminor and typ in ("char", "block"):
        e["devMinor"] = ti.devminor
    xattrs = pax_xattrs(ti)
    if xattrs:
        e["xattrs"] = xattrs
    return e


class _Frames:
    def __init__(self, level: int) -> None:
        self.cctx = zstandard.ZstdCompressor(level=level)
        self.out = bytearray()
        self.pending = bytearray()
        self.diff = hashlib.sha256()
        self.usize = 0

    def write(self, data: bytes) -> None:
        self.pending += data
        self.diff.update(data)
        self.usize += len(data)

    def close_frame(self) -> int:
        if self.pending:
            self.out += self.cctx.compress(bytes(self.pending))
            self.pending.clear()
        return len(self.out)


class _TarSplit:
    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def add(self, typ: int, payload: bytes | None, name: str | None = None, size: int = 0) -> None:
        e: dict = {"type": typ}
        if name is not None:
            try:
                name.encode("utf-8")
                e["name"] = name
            except UnicodeEncodeError:
                e["name_raw"] = base64.b64encode(name.encode("utf-8", "surrogateescape")).decode()
        if size:
            e["size"] = size
        e["payload"] = None if payload is None else base64.b64encode(payload).decode()
        e["position"] = len(self.lines)
        self.lines.append(json.dumps(e, separators=(",", ":")).encode() + b"\n")


def build_zstdchunked(
    entries: Iterable[tuple[tarfile.TarInfo, bytes | None]],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    level: int = 10,
) -> ZstdChunkedLayer:
    """Write a zstd:chunked layer (current generation) from (header, payload) pairs."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    items = prepare_entries(entries)
    frames = _Frames(level)
    ts = _TarSplit()
    metadata: list[dict] = []
    pad = b""
    for ti, data in items:
        ti.mtime = int(ti.mtime)  # a fractional mtime would need a PAX record the TOC cannot mirror
        header = pad + tar_header(ti)
        frames.write(header)
        ts.add(2, header)
        ent = manifest_entry(ti)
        metadata.append(ent)
        ts.add(1, crc64_iso(data) if data else None, name=ent["name"], size=len(data))
        pad = tar_padding(len(data))
        if not data:
            continue
        start = frames.close_frame()
        chunks: list[dict] = []
        for off in range(0, len(data), chunk_size):
            piece = data[off : off + chunk_size]
            c = {
                "offset": frames.close_frame(),
                "chunkOffset": off,
                "chunkSize": len(piece),
                "chunkDigest": sha256_digest(piece),
            }
            if piece.count(0) == len(piece):
                c["chunkType"] = "zeros"
            frames.write(piece)
            chunks.append(c)
        end = frames.close_frame()
        ent["digest"] = sha256_digest(data)
        ent["offset"] = start
        ent["endOffset"] = end
        if len(chunks) > 1:
            ent.update({k: v for k, v in chunks[0].items() if k != "chunkOffset"})
            for c in chunks[1:]:
                metadata.append({"type": "chunk", "name": ent["name"], **c})
    tail = pad + TAR_TRAILER
    frames.write(tail)
    ts.add(2, tail)
    ts.add(2, b"")
    data_end = frames.close_frame()

    ts_raw = b"".join(ts.lines)
    ts_compressed = frames.cctx.compress(ts_raw)
    toc = {"version": 1, "entries": metadata, "tarSplitDigest": sha256_digest(ts_compressed)}
    toc_json = json.dumps(toc, separators=(",", ":")).encode()
    toc_compressed = frames.cctx.compress(toc_json)

    manifest_offset = data_end + SKIPPABLE_HEADER
    ts_offset = manifest_offset + len(toc_compressed) + SKIPPABLE_HEADER
    foot = footer(
        manifest_offset, len(toc_compressed), len(toc_json), ts_offset, len(ts_compressed), len(ts_raw)
    )
    blob = (
        bytes(frames.out)
        + skippable_frame(toc_compressed)
        + skippable_frame(ts_compressed)
        + skippable_frame(foot)
    )
    annotations = {
        CHECKSUM_ANNOTATION: sha256_digest(toc_compressed),
        POSITION_ANNOTATION: f"{manifest_offset}:{len(toc_compressed)}:{len(toc_json)}:{MANIFEST_TYPE_CRFS}",
        TARSPLIT_POSITION_ANNOTATION: f"{ts_offset}:{len(ts_compressed)}:{len(ts_raw)}",
    }
    return ZstdChunkedLayer(blob, annotations, toc_json, "sha256:" + frames.diff.hexdigest(), frames.usize)
