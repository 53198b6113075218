"""A layer's TOC as flat columns: one typed array per field and one byte pool for names.

A Python object per entry (an `Entry`, its `Chunk`s, their strings and dicts) costs about a
kilobyte; a 33k-entry layer then takes 35 MB in every process that loads it, and a hostile
TOC of a few hundred thousand entries takes gigabytes before anything refuses it.  Columns
cost about 150 bytes an entry, serialise to one buffer as they are (`to_bytes`), and are
read back without copying (`TocTable.from_buffer` over an mmap of the store's file), so the
supervisors of every container of an image share one copy in the page cache.

The table is a `Sequence[Entry]`: `table[i]` makes entry i's `Entry` when it is asked for
(a fill, a tree build), and the columnar helpers (`kind`, `size`, `name`, `data_files`,
`span`) answer the questions asked of every entry without making objects.  Pure: bytes in,
objects out; a buffer that is not a well-formed table is a `FormatError`.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterator, Sequence
from typing import overload

from .toc import Chunk, Entry, FormatError

#: Entry types by their column code (the order is part of the serialised form).
TYPES = ("dir", "reg", "symlink", "hardlink", "char", "block", "fifo")
TYPE_CODES = {t: i for i, t in enumerate(TYPES)}
DIR, REG, SYMLINK, HARDLINK = 0, 1, 2, 3

_MAGIC = b"LZTOCTB1"
_HEAD = struct.Struct("<8sQQQQQ")  # magic, entries, chunks, pool bytes, prioritized, flags
_F_NO_PREFETCH = 1
_HAS_DIGEST = 1  # entry and chunk flags
_ZEROS = 2  # chunk flags
_XATTR_HEAD = struct.Struct("<HI")  # key length, value length

# (name, array type code, bytes per row); entry columns, then chunk columns, then the pool.
_ENTRY_COLUMNS = (
    ("kind", "B", 1), ("flags", "B", 1), ("mode", "H", 2), ("name_len", "H", 2), ("link_len", "H", 2),
    ("uid", "I", 4), ("gid", "I", 4), ("dev_major", "I", 4), ("dev_minor", "I", 4),
    ("chunk_first", "I", 4), ("chunk_count", "I", 4), ("xattr_len", "I", 4),
    ("size", "Q", 8), ("mtime", "q", 8), ("name_off", "Q", 8), ("link_off", "Q", 8), ("xattr_off", "Q", 8),
    ("digest", "B", 32),
)
_CHUNK_COLUMNS = (
    ("c_flags", "B", 1), ("c_offset", "Q", 8), ("c_end", "Q", 8), ("c_inner", "Q", 8),
    ("c_file_offset", "Q", 8), ("c_size", "Q", 8), ("c_digest", "B", 32),
)
#: Bounds on a serialised table, checked before anything is sliced by them.
MAX_ROWS = 1 << 32


def _aligned(n: int) -> int:
    return (n + 7) & ~7


class TocTable(Sequence[Entry]):
    """A validated layer TOC in columns (see the module docstring)."""

    __slots__ = ("_buf", "n", "n_chunks", "pool", "prioritized", "no_prefetch", *(c[0] for c in _ENTRY_COLUMNS),
                 *(c[0] for c in _CHUNK_COLUMNS))

    def __init__(self, columns: dict, pool, prioritized: int = 0, no_prefetch: bool = False, buf=None) -> None:
        for name, _, _ in (*_ENTRY_COLUMNS, *_CHUNK_COLUMNS):
            setattr(self, name, columns[name])
        self.n = len(columns["kind"])
        self.n_chunks = len(columns["c_flags"])
        self.pool = pool
        self.prioritized = prioritized
        self.no_prefetch = no_prefetch
        self._buf = buf  # what the columns are views of (an mmap): kept alive with them

    # ---- serialised form ----------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """Header, every column (each padded to 8 bytes), the pool."""
        parts = [_HEAD.pack(_MAGIC, self.n, self.n_chunks, len(self.pool), self.prioritized,
                            _F_NO_PREFETCH if self.no_prefetch else 0)]
        for name, _, _ in (*_ENTRY_COLUMNS, *_CHUNK_COLUMNS):
            raw = bytes(getattr(self, name))
            parts.append(raw + bytes(_aligned(len(raw)) - len(raw)))
        parts.append(bytes(self.pool))
        return b"".join(parts)

    @classmethod
    def from_buffer(cls, buf) -> TocTable:
        """A table over `buf` (bytes, or an mmap that must outlive it), without copying."""
        mv = memoryview(buf)
        if len(mv) < _HEAD.size:
            raise FormatError("TOC table is truncated")
        magic, n, n_chunks, pool_len, prioritized, flags = _HEAD.unpack_from(mv)
        if magic != _MAGIC:
            raise FormatError("not a TOC table (bad magic)")
        if n >= MAX_ROWS or n_chunks >= MAX_ROWS or prioritized > n:
            raise FormatError(f"TOC table has impossible counts ({n} entries, {n_chunks} chunks)")
        pos = _HEAD.size
        columns = {}
        for rows, specs in ((n, _ENTRY_COLUMNS), (n_chunks, _CHUNK_COLUMNS)):
            for name, code, width in specs:
                nbytes = rows * width
                if pos + nbytes > len(mv):
                    raise FormatError("TOC table is truncated")
                col = mv[pos:pos + nbytes]
                columns[name] = col if code == "B" else col.cast(code)
                pos += _aligned(nbytes)
        if pos + pool_len != len(mv):
            raise FormatError("TOC table is truncated or has trailing bytes")
        table = cls(columns, mv[pos:], prioritized, bool(flags & _F_NO_PREFETCH), buf)
        table.n = n  # the 32-byte digest columns are not one row per byte
        table.n_chunks = n_chunks
        table._check_links()
        return table

    def _check_links(self) -> None:
        """Every reference between columns stays inside them (a damaged file must not make a
        table whose entries point at other entries' bytes or past the pool).  At C speed:
        this runs at every supervisor start."""
        if not self.n:
            return
        from operator import add

        pool = len(self.pool)
        if (max(map(add, self.chunk_first, self.chunk_count)) > self.n_chunks
                or max(map(add, self.name_off, self.name_len)) > pool
                or max(map(add, self.link_off, self.link_len)) > pool
                or max(map(add, self.xattr_off, self.xattr_len)) > pool or max(self.kind) >= len(TYPES)):
            raise FormatError("TOC table has an entry that points outside the table")

    # ---- Sequence[Entry] -----------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    @overload
    def __getitem__(self, i: int) -> Entry: ...
    @overload
    def __getitem__(self, i: slice) -> list[Entry]: ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._entry(k) for k in range(*i.indices(self.n))]
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError("TOC table index out of range")
        return self._entry(i)

    def _entry(self, i: int) -> Entry:
        """Entry i as an object (a tree build makes one per entry: kept to plain indexing)."""
        pool = self.pool
        off = self.name_off[i]
        name = str(pool[off:off + self.name_len[i]], "utf-8")
        n = self.link_len[i]
        if n:
            off = self.link_off[i]
            link = str(pool[off:off + n], "utf-8")
        else:
            link = ""
        n = self.chunk_count[i]
        if n:
            first = self.chunk_first[i]
            chunks = [self._chunk(k) for k in range(first, first + n)]
        else:
            chunks = []
        digest = "sha256:" + self.digest[32 * i:32 * i + 32].hex() if self.flags[i] & _HAS_DIGEST else None
        return Entry(name, TYPES[self.kind[i]], self.mode[i], self.uid[i], self.gid[i], self.size[i], self.mtime[i],
                     link, self.dev_major[i], self.dev_minor[i], self.xattrs(i) if self.xattr_len[i] else {},
                     digest, chunks)

    def __eq__(self, other: object) -> bool:
        """Equal to any sequence of the same entries (a list of `Entry`, another table)."""
        if not isinstance(other, Sequence) or isinstance(other, str | bytes):
            return NotImplemented
        return len(other) == self.n and all(a == b for a, b in zip(self, other, strict=True))

    __hash__ = None  # type: ignore[assignment]

    def __iter__(self) -> Iterator[Entry]:
        entry = self._entry
        for i in range(self.n):
            yield entry(i)

    def _chunk(self, k: int) -> Chunk:
        f = self.c_flags[k]
        digest = "sha256:" + self.c_digest[32 * k:32 * k + 32].hex() if f & _HAS_DIGEST else None
        return Chunk(self.c_offset[k], self.c_end[k], self.c_inner[k], self.c_file_offset[k], self.c_size[k],
                     digest, bool(f & _ZEROS))

    # ---- columns, without making entries -------------------------------------------------
    def name(self, i: int) -> str:
        off = self.name_off[i]
        return str(self.pool[off:off + self.name_len[i]], "utf-8")

    def link(self, i: int) -> str:
        off = self.link_off[i]
        return str(self.pool[off:off + self.link_len[i]], "utf-8")

    def type_of(self, i: int) -> str:
        return TYPES[self.kind[i]]

    def digest_of(self, i: int) -> str | None:
        if not self.flags[i] & _HAS_DIGEST:
            return None
        return "sha256:" + self.digest[32 * i:32 * i + 32].hex()

    def xattrs(self, i: int) -> dict[str, bytes]:
        n = self.xattr_len[i]
        if not n:
            return {}
        return decode_xattrs(bytes(self.pool[self.xattr_off[i]:self.xattr_off[i] + n]))

    def names(self) -> Iterator[str]:
        for i in range(self.n):
            yield self.name(i)

    def data_files(self) -> list[int]:
        """Indices of the regular files with content (what fills, counts and plans are about)."""
        kind, size = self.kind, self.size
        return [i for i in range(self.n) if kind[i] == REG and size[i]]

    def regular_files(self) -> int:
        """How many entries are regular files (empty ones too)."""
        return bytes(self.kind).count(REG)

    def regular_bytes(self) -> int:
        """The size of all regular files together (the layer's content)."""
        from itertools import compress

        return sum(compress(self.size, map(REG.__eq__, self.kind)))

    def span(self, i: int) -> tuple[int, int]:
        """The compressed byte range holding all of entry i's data chunks ((0, 0) if none)."""
        lo = hi = -1
        flags, off, end = self.c_flags, self.c_offset, self.c_end
        first = self.chunk_first[i]
        for k in range(first, first + self.chunk_count[i]):
            if flags[k] & _ZEROS:
                continue
            if lo < 0 or off[k] < lo:
                lo = off[k]
            if end[k] > hi:
                hi = end[k]
        return (0, 0) if lo < 0 else (lo, hi)

    def has_chunks(self, i: int) -> bool:
        return self.chunk_count[i] > 0

    @classmethod
    def from_entries(cls, entries: Sequence[Entry], prioritized: int = 0, no_prefetch: bool = False) -> TocTable:
        """The table of already validated entries (legacy layers, tests, stores written before tables)."""
        if isinstance(entries, TocTable):
            return entries
        b = TableBuilder()
        for e in entries:
            i = b.add(e.name.encode(), TYPE_CODES[e.type], e.mode, e.uid, e.gid, e.size, e.mtime, e.link.encode(),
                      e.dev_major, e.dev_minor, encode_xattrs(e.xattrs) if e.xattrs else b"",
                      _raw_digest(e.digest))
            for c in e.chunks:
                b.add_chunk(i, c.offset, c.end, c.inner_offset, c.file_offset, c.size, _raw_digest(c.digest), c.zeros)
        return b.finish(prioritized, no_prefetch)


def _raw_digest(d: str | None) -> bytes | None:
    return bytes.fromhex(d[7:]) if d else None


class TableBuilder:
    """Appends validated rows; `finish` makes the table.  The caller validates (`build_toc`)."""

    def __init__(self) -> None:
        self.cols: dict[str, array] = {name: array(code) for name, code, _ in (*_ENTRY_COLUMNS, *_CHUNK_COLUMNS)}
        self.pool = bytearray()
        c = self.cols
        # Bound methods, looked up once: `add` runs for every entry of every pull.
        self._app = [c[name].append for name, _, _ in _ENTRY_COLUMNS if name != "digest"]
        self._digest = c["digest"]
        self._capp = [c[name].append for name, _, _ in _CHUNK_COLUMNS if name != "c_digest"]
        self._cdigest = c["c_digest"]
        self._zero_digest = bytes(32)

    def add(self, name: bytes, kind: int, mode: int, uid: int, gid: int, size: int, mtime: int, link: bytes,
            dev_major: int, dev_minor: int, xattrs: bytes, digest: bytes | None) -> int:
        """Append one entry (names as UTF-8 bytes, a digest as 32 raw bytes); its index."""
        pool = self.pool
        name_off = len(pool)
        pool += name
        link_off = len(pool)
        pool += link
        xattr_off = len(pool)
        pool += xattrs
        i = len(self.cols["kind"])
        (a_kind, a_flags, a_mode, a_name_len, a_link_len, a_uid, a_gid, a_maj, a_min, a_cfirst, a_ccount, a_xlen,
         a_size, a_mtime, a_name_off, a_link_off, a_xattr_off) = self._app
        a_kind(kind)
        a_flags(0 if digest is None else _HAS_DIGEST)
        a_mode(mode)
        a_name_len(len(name))
        a_link_len(len(link))
        a_uid(uid)
        a_gid(gid)
        a_maj(dev_major)
        a_min(dev_minor)
        a_cfirst(len(self.cols["c_flags"]))
        a_ccount(0)
        a_xlen(len(xattrs))
        a_size(size)
        a_mtime(mtime)
        a_name_off(name_off)
        a_link_off(link_off)
        a_xattr_off(xattr_off)
        self._digest.frombytes(digest or self._zero_digest)
        return i

    def add_chunk(self, i: int, offset: int, end: int, inner: int, file_offset: int, size: int,
                  digest: bytes | None, zeros: bool) -> None:
        """Append a chunk of entry i, which must be the last entry added."""
        f_flags, f_off, f_end, f_inner, f_fileoff, f_size = self._capp
        f_flags((0 if digest is None else _HAS_DIGEST) | (_ZEROS if zeros else 0))
        f_off(offset)
        f_end(end)
        f_inner(inner)
        f_fileoff(file_offset)
        f_size(size)
        self._cdigest.frombytes(digest or self._zero_digest)
        self.cols["chunk_count"][i] += 1

    def finish(self, prioritized: int = 0, no_prefetch: bool = False) -> TocTable:
        cols = dict(self.cols)
        for name in ("digest", "c_digest"):  # read as slices (views have .hex()); never grown again
            cols[name] = memoryview(cols[name])
        t = TocTable(cols, self.pool, prioritized, no_prefetch)
        t.n = len(self.cols["kind"])
        t.n_chunks = len(self.cols["c_flags"])
        return t


def encode_xattrs(xattrs: dict[str, bytes]) -> bytes:
    out = bytearray()
    for k, v in xattrs.items():
        kb = k.encode()
        out += _XATTR_HEAD.pack(len(kb), len(v))
        out += kb
        out += v
    return bytes(out)


def decode_xattrs(raw: bytes) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    pos = 0
    while pos < len(raw):
        if pos + _XATTR_HEAD.size > len(raw):
            raise FormatError("TOC table xattrs are truncated")
        klen, vlen = _XATTR_HEAD.unpack_from(raw, pos)
        pos += _XATTR_HEAD.size
        if pos + klen + vlen > len(raw):
            raise FormatError("TOC table xattrs are truncated")
        try:
            k = raw[pos:pos + klen].decode()
        except UnicodeDecodeError as e:
            raise FormatError("TOC table xattr name is not UTF-8") from e
        out[k] = raw[pos + klen:pos + klen + vlen]
        pos += klen + vlen
    return out
