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
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain

# Bounds: generous for real images, small enough that a hostile TOC cannot make us
# allocate or fetch without limit.
#: Entries (chunk entries included) of one TOC.  A pull holds about 500 bytes per entry
#: while it validates and builds (columns, the name index, the tree's bookkeeping), so this
#: keeps the worst TOC under 256 MB; real images have far fewer (the pysci image: 33k).
MAX_ENTRIES = 262_144
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

    entries: Sequence[Entry]  # a `toctable.TocTable` when read from a TOC or the store
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


def _name(raw: object) -> str:
    """`normalize_name`, with a fast path for the usual already normal names (a dir's one
    trailing slash allowed): no empty, "." or ".." component, nothing to rewrite."""
    if type(raw) is str and 0 < len(raw) <= MAX_NAME:
        s = raw[:-1] if raw[-1] == "/" else raw
        if (s and s[0] != "/" and s[0] != "." and s[-1] != "/" and "//" not in s and "/." not in s
                and "\x00" not in s):
            return s
    return normalize_name(raw)


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


def build_toc(raw_entries: Iterable[object], blob_data_end: int) -> Toc:
    """Validate raw JSON TOC entries (eStargz or zstd:chunked) into a `Toc` of columns.

    `raw_entries` may be a generator (a streaming parse): no entry is kept as a dict or an
    object, and more than MAX_ENTRIES of them are refused as they come.
    `blob_data_end` is the first byte after the last file payload (the TOC's offset):
    every chunk must lie before it.  Chunk ends are derived from the next larger payload
    offset, because eStargz records only where each compressed member starts.
    zstd:chunked's `endOffset` marks where a file's compressed data ends (containers/storage
    writes it on the file's first entry even when the file has several chunks), so it
    bounds the file's LAST chunk; an `endOffset` on a "chunk" entry bounds that chunk.
    """
    from .toctable import DIR, HARDLINK, REG, TYPE_CODES, TableBuilder, encode_xattrs

    if isinstance(raw_entries, dict | str | bytes) or not hasattr(raw_entries, "__iter__"):
        raise FormatError("TOC has no entries list")
    if isinstance(raw_entries, list) and len(raw_entries) > MAX_ENTRIES:
        raise FormatError(f"TOC has {len(raw_entries)} entries (limit {MAX_ENTRIES})")
    if isinstance(blob_data_end, bool) or not isinstance(blob_data_end, int) or blob_data_end < 0:
        raise FormatError(f"bad data end {blob_data_end!r}")
    b = TableBuilder()
    kinds = b.cols["kind"]
    sizes = b.cols["size"]
    by_name: dict[str, int] = {}
    hardlink_targets: dict[int, str] = {}  # hardlink entry -> the file it names
    ends = array("Q", [blob_data_end])  # explicit ends; with the chunks' starts: where payloads end
    file_ends: dict[int, int] = {}  # entry index -> end of its compressed data (endOffset)
    prioritized = 0
    no_prefetch = False
    regs_seen = 0
    last_reg: _File | None = None
    count = 0
    for d in raw_entries:
        count += 1
        if count > MAX_ENTRIES:
            raise FormatError(f"TOC has more than {MAX_ENTRIES} entries")
        if not isinstance(d, dict):
            raise FormatError("TOC entry is not an object")
        get = d.get
        typ = get("type")
        if typ == "chunk":
            name = _name(d.get("name"))
            if last_reg is None or last_reg.name != name:
                raise FormatError(f"chunk entry {name[:80]!r} does not follow its file")
            _add_chunk(b, last_reg, d, blob_data_end, ends)
            continue
        if not isinstance(typ, str) or typ not in ENTRY_TYPES:
            raise FormatError(f"entry {str(d.get('name'))[:80]!r}: unknown type {str(typ)[:20]!r}")
        raw_name = d.get("name")
        name = _name(raw_name) if raw_name not in ("./", ".", "/") else ""
        if name == "" and typ != "dir":
            raise FormatError(f"the layer root is a {str(typ)[:20]}, not a directory")
        last_reg = None
        if typ == "reg" and name in _SKIPPED_NAMES:
            if name == PREFETCH_LANDMARK:
                prioritized = regs_seen
            elif name == NO_PREFETCH_LANDMARK:
                no_prefetch = True
            continue
        kind = TYPE_CODES[typ]
        # The usual values inline (this loop runs for every entry of every pull); `_int` for the rest.
        mode, uid, gid = get("mode", 0), get("uid", 0), get("gid", 0)
        if type(mode) is not int or not 0 <= mode <= 0o177777:
            mode = _int(d, "mode", 0, 0o7777 | 0o170000)
        mode &= 0o7777
        if type(uid) is not int or not 0 <= uid <= MAX_ID:
            uid = _int(d, "uid", 0, MAX_ID)
        if type(gid) is not int or not 0 <= gid <= MAX_ID:
            gid = _int(d, "gid", 0, MAX_ID)
        mtime = _mtime(get("modtime"))
        dev_major = dev_minor = 0
        if "devMajor" in d or "devMinor" in d:
            dev_major, dev_minor = _int(d, "devMajor", 0, MAX_ID), _int(d, "devMinor", 0, MAX_ID)
        xattrs = _xattrs(d) if "xattrs" in d else None
        if kind == DIR:
            prev = by_name.get(name)
            if prev is not None and kinds[prev] == DIR:  # a dir listed twice: the last metadata wins
                b.cols["mode"][prev], b.cols["uid"][prev], b.cols["gid"][prev] = mode, uid, gid
                continue
        link = ""
        size = 0
        digest: bytes | None = None
        if typ == "symlink":
            link = d.get("linkName")
            if not isinstance(link, str) or not link or len(link) > MAX_NAME or "\x00" in link:
                raise FormatError(f"symlink {name[:80]!r}: bad target")
            _check_utf8(link)
        elif kind == HARDLINK:
            target = link = normalize_name(d.get("linkName"))
            t = by_name.get(target)
            if t is not None and kinds[t] == HARDLINK:  # tar may chain links: point at the file
                link = hardlink_targets[t]
                t = by_name.get(link)
            if t is None or kinds[t] == DIR or not target:
                raise FormatError(f"hardlink {name[:80]!r} -> {target[:80]!r}: target is not an earlier file")
            size = sizes[t]
        elif kind == REG:
            size = get("size", 0)
            if type(size) is not int or not 0 <= size <= MAX_FILE_SIZE:
                size = _int(d, "size", 0, MAX_FILE_SIZE)
            dg = get("digest")
            if dg is not None and (type(dg) is not str or not _DIGEST_RE.match(dg)):
                dg = _digest(d, "digest")
            if size and not dg:
                raise FormatError(f"file {name[:80]!r} has no digest")
            digest = bytes.fromhex(dg[7:]) if dg else None
            regs_seen += 1
        try:
            raw_name = name.encode()
        except UnicodeEncodeError:  # JSON can carry lone surrogates; no file system name can
            raise FormatError(f"name is not valid UTF-8: {name[:80]!r}") from None
        i = b.add(raw_name, kind, mode, uid, gid, size, mtime, link.encode(), dev_major, dev_minor,
                  encode_xattrs(xattrs) if xattrs else b"", digest)
        if kind == HARDLINK:
            hardlink_targets[i] = link
        elif kind == REG:
            last_reg = _File(i, name, size)
            if size:
                end = d.get("endOffset")
                _add_chunk(b, last_reg, d, blob_data_end, ends, first=True)
                if end not in (None, 0):
                    file_ends[i] = _int(d, "endOffset", b.cols["c_offset"][-1] + 1, blob_data_end)
                    ends.append(file_ends[i])
        by_name[name] = i
    table = b.finish(prioritized, no_prefetch)
    _finish_chunks(table, sorted(chain(table.c_offset, ends)), file_ends)
    return Toc(entries=table, prioritized=prioritized, no_prefetch=no_prefetch)


@dataclass(slots=True)
class _File:
    """The regular file whose chunk entries may follow (while its TOC is read)."""

    index: int
    name: str
    size: int
    next_offset: int = 0  # where its next chunk must start in the file
    chunks: int = 0


def _add_chunk(b, f: _File, d: dict, blob_data_end: int, ends: array, first: bool = False) -> None:
    get = d.get
    off, chunk_off, size = get("offset", 0), get("chunkOffset", 0), get("chunkSize", 0)
    if type(off) is not int or not 0 <= off < blob_data_end:
        off = _int(d, "offset", 0, blob_data_end - 1 if blob_data_end else 0)
    if type(chunk_off) is not int or not 0 <= chunk_off <= f.size:
        chunk_off = _int(d, "chunkOffset", 0, f.size)
    if type(size) is not int or not 0 <= size <= MAX_CHUNK_SIZE:
        size = _int(d, "chunkSize", 0, MAX_CHUNK_SIZE)
    if size == 0:  # an unchunked file, or the last chunk: up to the end of the file
        size = f.size - chunk_off
    if size <= 0 or size > MAX_CHUNK_SIZE or chunk_off + size > f.size:
        raise FormatError(f"file {f.name[:80]!r}: chunk beyond file size")
    if chunk_off != f.next_offset:
        raise FormatError(f"file {f.name[:80]!r}: chunks not contiguous at {chunk_off}")
    ctype = get("chunkType")
    zeros = ctype == "zeros"
    if not zeros and ctype not in (None, ""):
        raise FormatError(f"file {f.name[:80]!r}: unknown chunkType {str(ctype)[:20]!r}")
    inner = get("innerOffset", 0)
    if type(inner) is not int or not 0 <= inner <= MAX_CHUNK_SIZE:
        inner = _int(d, "innerOffset", 0, MAX_CHUNK_SIZE)
    dg = get("chunkDigest")
    if dg is not None and (type(dg) is not str or not _DIGEST_RE.match(dg)):
        dg = _digest(d, "chunkDigest")
    c_end = 0
    end = None if first else get("endOffset")  # a file's own endOffset bounds its last chunk
    if end not in (None, 0):
        c_end = _int(d, "endOffset", off + 1, blob_data_end)
        ends.append(c_end)
    b.add_chunk(f.index, off, c_end, inner, chunk_off, size, bytes.fromhex(dg[7:]) if dg else None, zeros)
    f.next_offset = chunk_off + size
    f.chunks += 1


def _finish_chunks(t, offsets: list[int], file_ends: dict[int, int]) -> None:
    """Give every chunk its compressed end and check that each file is fully covered."""
    import bisect

    from .toctable import REG

    kind, size, first, count = t.kind, t.size, t.chunk_first, t.chunk_count
    c_end, c_off, c_flags, c_file_off, c_size = t.c_end, t.c_offset, t.c_flags, t.c_file_offset, t.c_size
    zeros_flag = 2
    for i in range(t.n):
        if kind[i] != REG or not size[i]:
            continue
        name = None
        last = first[i] + count[i] - 1
        if c_file_off[last] + c_size[last] != size[i]:
            name = t.name(i)
            raise FormatError(f"file {name[:80]!r}: chunks do not cover its size")
        file_end = file_ends.get(i)
        if file_end is not None and c_end[last] == 0 and not c_flags[last] & zeros_flag:
            if file_end <= c_off[last]:
                raise FormatError(f"file {t.name(i)[:80]!r}: endOffset before its last chunk")
            c_end[last] = file_end
        for k in range(first[i], last + 1):
            if c_end[k] == 0 and not c_flags[k] & zeros_flag:
                j = bisect.bisect_right(offsets, c_off[k])
                if j >= len(offsets):
                    raise FormatError(f"file {t.name(i)[:80]!r}: chunk past the end of the data")
                c_end[k] = offsets[j]
