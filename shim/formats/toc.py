"""The format-neutral table of contents of one lazy layer.

eStargz and zstd:chunked both describe a layer as a JSON TOC of tar-like entries whose
regular files point at compressed byte ranges of the blob.  Readers of both formats turn
their TOC into the same `Toc` so everything downstream (store, placeholder trees, the
supervisor's fills) is written once.  This module is pure: bytes and dicts in, objects out.

Everything here treats the TOC as hostile: names are normalised and confined, every
number is bounded before anything downstream allocates, seeks or fetches by it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

# Bounds: generous for real images, small enough that a hostile TOC cannot make us
# allocate or fetch without limit.
MAX_ENTRIES = 2_000_000
MAX_NAME = 4096
MAX_FILE_SIZE = 1 << 40  # 1 TiB
MAX_CHUNK_SIZE = 1 << 30  # one chunk is decompressed in memory
MAX_XATTRS = 64
MAX_XATTR_VALUE = 64 * 1024
MAX_ID = (1 << 32) - 2

ENTRY_TYPES = frozenset({"dir", "reg", "symlink", "hardlink", "char", "block", "fifo"})
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

#: xattrs that control overlayfs itself; an image must never set them on our trees.
OVERLAY_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.")


class FormatError(ValueError):
    """The layer's bytes do not form a valid TOC or footer.  Always a clean one-line message."""


@dataclass(slots=True)
class Chunk:
    """One independently decompressible piece of a regular file.

    `offset`/`end` delimit the compressed bytes in the blob (a gzip member or a zstd
    frame); `inner_offset` is where this chunk's data starts inside the decompressed
    member; `file_offset` and `size` place the data inside the file.
    """

    offset: int
    end: int
    inner_offset: int
    file_offset: int
    size: int
    digest: str | None = None
    zeros: bool = False


@dataclass(slots=True)
class Entry:
    """One file-system object of a layer, after validation."""

    name: str  # normalised: relative, no leading "/" or "./", no trailing "/", never ".."
    type: str  # one of ENTRY_TYPES
    mode: int = 0o644  # permission bits incl. setuid/setgid/sticky (no file-type bits)
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0  # seconds since the epoch
    link: str = ""  # symlink target (verbatim) or hardlink target (normalised name)
    dev_major: int = 0
    dev_minor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    digest: str | None = None  # sha256 of the whole file content
    chunks: list[Chunk] = field(default_factory=list)


@dataclass(slots=True)
class Toc:
    """A validated layer TOC.

    `entries` keep TOC order (parents before children).  `prioritized` is the number of
    leading regular files that belong to the prioritized set (files before the
    `.prefetch.landmark`), 0 when the layer has no landmark.
    """

    entries: list[Entry]
    prioritized: int = 0
    no_prefetch: bool = False


PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
TOC_TAR_NAME = "stargz.index.json"
_SKIPPED_NAMES = frozenset({PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK, TOC_TAR_NAME})


def normalize_name(raw: object) -> str:
    """Return the confined relative form of a TOC name, or raise FormatError.

    A name with a `..` component is refused outright rather than clamped: an image that
    tries to climb out of its tree is hostile, and clamping would silently move a file.
    """
    if not isinstance(raw, str) or not raw or len(raw) > MAX_NAME or "\x00" in raw:
        raise FormatError(f"invalid entry name {str(raw)[:80]!r}")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise FormatError(f"entry name escapes the layer: {raw[:200]!r}")
    _check_utf8(raw)
    return "/".join(parts)


def _check_utf8(s: str) -> None:
    """JSON can carry lone surrogates; no file system name can."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise FormatError(f"name is not valid UTF-8: {s[:80]!r}") from e


def _int(d: dict, key: str, lo: int, hi: int, default: int = 0) -> int:
    v = d.get(key, default)
    if type(v) is int and lo <= v <= hi:  # the common case, first: this runs ~10 times per entry
        return v
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise FormatError(f"entry {str(d.get('name'))[:80]!r}: bad {key} {str(v)[:40]!r}")
    return v


def _digest(d: dict, key: str) -> str | None:
    v = d.get(key)
    if v in (None, ""):
        return None
    if not isinstance(v, str) or not _DIGEST_RE.match(v):
        raise FormatError(f"entry {str(d.get('name'))[:80]!r}: bad {key} {str(v)[:80]!r}")
    return v


def _mtime(v: object) -> int:
    """TOC modtimes are RFC 3339 strings; we keep whole seconds (tar's resolution)."""
    if not v:
        return 0
    if not isinstance(v, str) or len(v) > 64:
        raise FormatError(f"bad modtime {str(v)[:40]!r}")
    return _parse_mtime(v)


@functools.lru_cache(maxsize=4096)
def _parse_mtime(v: str) -> int:
    """Memoised: a layer's files mostly share a handful of timestamps."""
    from datetime import UTC, datetime

    s = v.replace("Z", "+00:00")
    # Python's fromisoformat accepts at most 6 fractional digits; Go writes up to 9.
    s = re.sub(r"(\.\d{6})\d+", r"\1", s)
    try:
        t = datetime.fromisoformat(s)
        if t.tzinfo is None:  # never depend on the local time zone
            t = t.replace(tzinfo=UTC)
        return int(t.timestamp())
    except (ValueError, OverflowError, OSError) as e:
        raise FormatError(f"bad modtime {v[:40]!r}") from e


def _xattrs(d: dict) -> dict[str, bytes]:
    raw = d.get("xattrs")
    if not raw:
        return {}
    if not isinstance(raw, dict) or len(raw) > MAX_XATTRS:
        raise FormatError(f"entry {str(d.get('name'))[:80]!r}: bad xattrs")
    import base64
    import binascii

    out: dict[str, bytes] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k or len(k) > 255 or "\x00" in k:
            raise FormatError(f"entry {str(d.get('name'))[:80]!r}: bad xattr")
        _check_utf8(k)
        if k.startswith(OVERLAY_XATTR_PREFIXES):
            continue  # never let an image steer overlayfs
        try:
            val = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError) as e:
            raise FormatError(f"entry {str(d.get('name'))[:80]!r}: xattr {k[:60]!r} not base64") from e
        if len(val) > MAX_XATTR_VALUE:
            raise FormatError(f"entry {str(d.get('name'))[:80]!r}: xattr {k[:60]!r} too large")
        out[k] = val
    return out


def load_toc_document(toc_json: bytes, what: str) -> dict:
    """The TOC JSON object of either format (version 1), or a clean FormatError."""
    import json

    try:
        doc = json.loads(toc_json)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{what} is not JSON: {str(e)[:100]}") from e
    if not isinstance(doc, dict):
        raise FormatError(f"{what} is not a JSON object")
    if doc.get("version") != 1:
        raise FormatError(f"unsupported {what} version {str(doc.get('version'))[:20]!r}")
    return doc


def build_toc(raw_entries: object, blob_data_end: int) -> Toc:
    """Validate raw JSON TOC entries (eStargz or zstd:chunked) into a `Toc`.

    `blob_data_end` is the first byte after the last file payload (the TOC's offset):
    every chunk must lie before it.  Chunk ends are derived from the next larger payload
    offset, because eStargz records only where each compressed member starts.
    zstd:chunked's `endOffset` marks where a file's compressed data ends (containers/storage
    writes it on the file's first entry even when the file has several chunks), so it
    bounds the file's LAST chunk; an `endOffset` on a "chunk" entry bounds that chunk.
    """
    if not isinstance(raw_entries, list):
        raise FormatError("TOC has no entries list")
    if len(raw_entries) > MAX_ENTRIES:
        raise FormatError(f"TOC has {len(raw_entries)} entries (limit {MAX_ENTRIES})")
    if isinstance(blob_data_end, bool) or not isinstance(blob_data_end, int) or blob_data_end < 0:
        raise FormatError(f"bad data end {blob_data_end!r}")
    entries: list[Entry] = []
    by_name: dict[str, Entry] = {}
    offsets: set[int] = {blob_data_end}
    file_ends: dict[int, int] = {}  # id(Entry) -> end of its compressed data (endOffset)
    prioritized = 0
    no_prefetch = False
    regs_seen = 0
    last_reg: Entry | None = None
    for d in raw_entries:
        if not isinstance(d, dict):
            raise FormatError("TOC entry is not an object")
        typ = d.get("type")
        if typ == "chunk":
            name = normalize_name(d.get("name"))
            if last_reg is None or last_reg.name != name:
                raise FormatError(f"chunk entry {name[:80]!r} does not follow its file")
            _add_chunk(last_reg, d, blob_data_end, offsets)
            continue
        if not isinstance(typ, str) or typ not in ENTRY_TYPES:
            raise FormatError(f"entry {str(d.get('name'))[:80]!r}: unknown type {str(typ)[:20]!r}")
        name = normalize_name(d.get("name")) if d.get("name") not in ("./", ".", "/") else ""
        if name == "" and typ != "dir":
            raise FormatError(f"the layer root is a {str(typ)[:20]}, not a directory")
        last_reg = None
        if typ == "reg" and name in _SKIPPED_NAMES:
            if name == PREFETCH_LANDMARK:
                prioritized = regs_seen
            elif name == NO_PREFETCH_LANDMARK:
                no_prefetch = True
            continue
        e = Entry(
            name=name,
            type=typ,
            mode=_int(d, "mode", 0, 0o7777 | 0o170000) & 0o7777,
            uid=_int(d, "uid", 0, MAX_ID),
            gid=_int(d, "gid", 0, MAX_ID),
            mtime=_mtime(d.get("modtime")),
            dev_major=_int(d, "devMajor", 0, MAX_ID),
            dev_minor=_int(d, "devMinor", 0, MAX_ID),
            xattrs=_xattrs(d),
        )
        if typ == "symlink":
            link = d.get("linkName")
            if not isinstance(link, str) or not link or len(link) > MAX_NAME or "\x00" in link:
                raise FormatError(f"symlink {name[:80]!r}: bad target")
            _check_utf8(link)
            e.link = link
        elif typ == "hardlink":
            target = normalize_name(d.get("linkName"))
            t = by_name.get(target)
            if t is not None and t.type == "hardlink":  # tar may chain links: point at the file
                t = by_name.get(t.link)
            if t is None or t.type == "dir" or not target:
                raise FormatError(f"hardlink {name[:80]!r} -> {target[:80]!r}: target is not an earlier file")
            e.link = t.name
            e.size = t.size
        elif typ == "reg":
            e.size = _int(d, "size", 0, MAX_FILE_SIZE)
            e.digest = _digest(d, "digest")
            if e.size and e.digest is None:
                raise FormatError(f"file {name[:80]!r} has no digest")
            regs_seen += 1
            last_reg = e
            if e.size:
                end = d.get("endOffset")
                _add_chunk(e, {k: v for k, v in d.items() if k != "endOffset"}, blob_data_end, offsets)
                if end not in (None, 0):
                    file_ends[id(e)] = _int(d, "endOffset", e.chunks[0].offset + 1, blob_data_end)
                    offsets.add(file_ends[id(e)])
        if name in by_name and by_name[name].type == "dir" and typ == "dir":
            by_name[name].mode, by_name[name].uid, by_name[name].gid = e.mode, e.uid, e.gid
            continue
        by_name[name] = e
        entries.append(e)
    _finish_chunks(entries, sorted(offsets), file_ends)
    return Toc(entries=entries, prioritized=prioritized, no_prefetch=no_prefetch)


def _add_chunk(e: Entry, d: dict, blob_data_end: int, offsets: set[int]) -> None:
    off = _int(d, "offset", 0, blob_data_end - 1 if blob_data_end else 0)
    chunk_off = _int(d, "chunkOffset", 0, e.size)
    size = _int(d, "chunkSize", 0, MAX_CHUNK_SIZE)
    if size == 0:  # an unchunked file, or the last chunk: up to the end of the file
        size = e.size - chunk_off
    if size <= 0 or size > MAX_CHUNK_SIZE or chunk_off + size > e.size:
        raise FormatError(f"file {e.name[:80]!r}: chunk beyond file size")
    expected = e.chunks[-1].file_offset + e.chunks[-1].size if e.chunks else 0
    if chunk_off != expected:
        raise FormatError(f"file {e.name[:80]!r}: chunks not contiguous at {chunk_off}")
    zeros = d.get("chunkType") == "zeros"
    if not zeros and d.get("chunkType") not in (None, ""):
        raise FormatError(f"file {e.name[:80]!r}: unknown chunkType {str(d.get('chunkType'))[:20]!r}")
    c = Chunk(
        offset=off,
        end=0,
        inner_offset=_int(d, "innerOffset", 0, MAX_CHUNK_SIZE),
        file_offset=chunk_off,
        size=size,
        digest=_digest(d, "chunkDigest"),
        zeros=zeros,
    )
    end = d.get("endOffset")
    if end not in (None, 0):
        c.end = _int(d, "endOffset", off + 1, blob_data_end)
        offsets.add(c.end)
    e.chunks.append(c)
    offsets.add(off)


def _finish_chunks(entries: list[Entry], offsets: list[int], file_ends: dict[int, int]) -> None:
    """Give every chunk its compressed end and check that each file is fully covered."""
    import bisect

    for e in entries:
        if e.type != "reg" or not e.size:
            continue
        last = e.chunks[-1]
        if last.file_offset + last.size != e.size:
            raise FormatError(f"file {e.name[:80]!r}: chunks do not cover its size")
        file_end = file_ends.get(id(e))
        if file_end is not None and last.end == 0 and not last.zeros:
            if file_end <= last.offset:
                raise FormatError(f"file {e.name[:80]!r}: endOffset before its last chunk")
            last.end = file_end
        for c in e.chunks:
            if c.end == 0 and not c.zeros:
                i = bisect.bisect_right(offsets, c.offset)
                if i >= len(offsets):
                    raise FormatError(f"file {e.name[:80]!r}: chunk past the end of the data")
                c.end = offsets[i]
