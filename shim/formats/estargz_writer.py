"""A small eStargz writer: tar entries in, a real-shaped eStargz blob out.

Layout (what stargz-snapshotter's `estargz` writer emits, so its readers and ours agree):
tar headers go into the currently open gzip member; every chunk of a regular file's
payload starts a new member (files larger than `chunk_size` become a "reg" entry plus
"chunk" entries); the tar padding after a payload and the following headers share that
payload's last member.  The TOC (`stargz.index.json`) is the last tar entry, alone in its
own member together with the tar end-of-archive blocks, and the 51-byte footer follows.
The whole blob is one valid (multi-member) gzip stream whose content is the layer's tar.

Pure: the caller hands over headers and payloads as bytes; nothing touches the disk.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import tarfile
import zlib
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import NamedTuple

from .estargz import footer_bytes, toc_digest
from .toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME, normalize_name

DEFAULT_CHUNK_SIZE = 4 << 20
LANDMARK_CONTENTS = b"\x0f"
_BLOCK = 512

_TAR_TYPES = {
    tarfile.REGTYPE: "reg",
    tarfile.AREGTYPE: "reg",
    tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}
_XATTR_PAX_PREFIX = "SCHILY.xattr."


class EstargzLayer(NamedTuple):
    blob: bytes
    toc_json: bytes
    toc_digest: str  # sha256 of toc_json: containerd.io/snapshot/stargz/toc.digest
    diff_id: str  # sha256 of the uncompressed tar
    uncompressed_size: int  # io.containers.estargz.uncompressed-size


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def tar_header(ti: tarfile.TarInfo) -> bytes:
    """The raw tar header block(s) for `ti` (PAX extensions only when needed)."""
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def tar_padding(size: int) -> bytes:
    return b"\x00" * (-size % _BLOCK)


TAR_TRAILER = b"\x00" * (2 * _BLOCK)


def prepare_entries(
    entries: Iterable[tuple[tarfile.TarInfo, bytes | None]],
) -> list[tuple[tarfile.TarInfo, bytes]]:
    """Copy the caller's headers, check payloads against types and fix regular file sizes."""
    out: list[tuple[tarfile.TarInfo, bytes]] = []
    for ti, data in entries:
        if ti.type not in _TAR_TYPES:
            raise ValueError(f"{ti.name!r}: unsupported tar type {ti.type!r}")
        ti = copy.copy(ti)
        ti.pax_headers = dict(ti.pax_headers)
        if ti.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
            data = data or b""
            ti.size = len(data)
        else:
            if data:
                raise ValueError(f"{ti.name!r}: only regular files carry data")
            data = b""
            ti.size = 0
        out.append((ti, data))
    return out


def order_prioritized(
    entries: list[tuple[tarfile.TarInfo, bytes]], prioritized: list[str]
) -> tuple[list[tuple[tarfile.TarInfo, bytes]], list[tuple[tarfile.TarInfo, bytes]]]:
    """Split entries into (prioritized first, the rest), like `estargz.Build`'s sort.

    A prioritized name pulls its parent directories (and, for a hardlink, its target)
    in front of it, so the reordered tar still extracts correctly.  Unknown names are an
    error: silently dropping them would give a different prefetch set than asked for.
    """
    index: dict[str, int] = {}
    for i, (ti, _) in enumerate(entries):
        index[normalize_name(ti.name) if ti.name not in ("./", ".", "/") else ""] = i
    taken: list[int] = []
    seen: set[int] = set()

    def take(name: str) -> None:
        parts = name.split("/")
        for depth in range(1, len(parts)):
            i = index.get("/".join(parts[:depth]))
            if i is not None and i not in seen:
                seen.add(i)
                taken.append(i)
        i = index[name]
        ti = entries[i][0]
        if ti.type == tarfile.LNKTYPE:
            target = normalize_name(ti.linkname)
            if target in index and index[target] not in seen:
                take(target)
        if i not in seen:
            seen.add(i)
            taken.append(i)

    missing = [p for p in prioritized if normalize_name(p) not in index]
    if missing:
        raise ValueError(f"prioritized files not in the layer: {missing[:5]}")
    for p in prioritized:
        take(normalize_name(p))
    first = [entries[i] for i in taken]
    rest = [e for i, e in enumerate(entries) if i not in seen]
    return first, rest


def landmark(name: str) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.mode = 0o644
    ti.size = len(LANDMARK_CONTENTS)
    return ti, LANDMARK_CONTENTS


def rfc3339(t: int) -> str:
    """A TOC modtime, as Go's time.Time marshals whole seconds in UTC."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pax_xattrs(ti: tarfile.TarInfo) -> dict[str, str]:
    """A tar member's xattrs (PAX SCHILY.xattr.*) as TOC JSON carries them: base64 values."""
    return {
        k[len(_XATTR_PAX_PREFIX):]: base64.b64encode(v.encode("utf-8", "surrogateescape")).decode()
        for k, v in ti.pax_headers.items()
        if k.startswith(_XATTR_PAX_PREFIX)
    }


def toc_entry(ti: tarfile.TarInfo) -> dict:
    """The TOC entry fields that come from the tar header (Go's omitempty order)."""
    typ = _TAR_TYPES[ti.type]
    name = ti.name + "/" if typ == "dir" and not ti.name.endswith("/") else ti.name
    e: dict = {"name": name, "type": typ}
    if typ == "reg" and ti.size:
        e["size"] = ti.size
    if ti.mtime:
        e["modtime"] = rfc3339(int(ti.mtime))
    if ti.linkname:
        e["linkName"] = ti.linkname
    if ti.mode:
        e["mode"] = ti.mode
    if ti.uid:
        e["uid"] = ti.uid
    if ti.gid:
        e["gid"] = ti.gid
    if ti.uname:
        e["userName"] = ti.uname
    if ti.gname:
        e["groupName"] = ti.gname
    if typ in ("char", "block"):
        if ti.devmajor:
            e["devMajor"] = ti.devmajor
        if ti.devminor:
            e["devMinor"] = ti.devminor
    xattrs = pax_xattrs(ti)
    if xattrs:
        e["xattrs"] = xattrs
    return e


class _GzipMembers:
    """Concatenated gzip members; `write` goes to the open member (opening one lazily)."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.out = bytearray()
        self.diff = hashlib.sha256()
        self.usize = 0
        self._z: zlib._Compress | None = None

    def write(self, data: bytes) -> None:
        if not data:
            return
        if self._z is None:
            self._z = zlib.compressobj(self.level, zlib.DEFLATED, 31)
        self.out += self._z.compress(data)
        self.diff.update(data)
        self.usize += len(data)

    def close_member(self) -> int:
        """Finish the open member (if any) and return the offset where the next one starts."""
        if self._z is not None:
            self.out += self._z.flush()
            self._z = None
        return len(self.out)


def build_estargz(
    entries: Iterable[tuple[tarfile.TarInfo, bytes | None]],
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    prioritized: list[str] | None = None,
    level: int = 9,
) -> EstargzLayer:
    """Write an eStargz layer from (header, payload) pairs, in the given order.

    `prioritized=None` writes no landmark; a list puts those files (and their parent
    directories) first followed by `.prefetch.landmark`, or writes `.no.prefetch.landmark`
    first when the list is empty.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    items = prepare_entries(entries)
    if prioritized is not None:
        first, rest = order_prioritized(items, prioritized)
        if first:
            items = first + [landmark(PREFETCH_LANDMARK)] + rest
        else:
            items = [landmark(NO_PREFETCH_LANDMARK)] + rest

    gz = _GzipMembers(level)
    toc_entries: list[dict] = []
    pad = b""
    for ti, data in items:
        gz.write(pad + tar_header(ti))
        ent = toc_entry(ti)
        toc_entries.append(ent)
        pad = tar_padding(len(data))
        if not data:
            continue
        file_digest = hashlib.sha256(data)
        cur = ent
        for chunk_off in range(0, len(data), chunk_size):
            piece = data[chunk_off : chunk_off + chunk_size]
            cur["offset"] = gz.close_member()
            if chunk_off:
                cur["chunkOffset"] = chunk_off
            if len(piece) == chunk_size:  # the Go writer leaves the short last chunk's size implicit
                cur["chunkSize"] = chunk_size
            cur["chunkDigest"] = sha256_digest(piece)
            gz.write(piece)
            if chunk_off + chunk_size < len(data):
                cur = {"name": ent["name"], "type": "chunk"}
                toc_entries.append(cur)
        ent["digest"] = "sha256:" + file_digest.hexdigest()

    toc_json = json.dumps({"version": 1, "entries": toc_entries}, indent="\t").encode()
    gz.write(pad)
    toc_off = gz.close_member()
    toc_ti = tarfile.TarInfo(TOC_TAR_NAME)
    toc_ti.size = len(toc_json)
    toc_ti.mode = 0o644
    gz.write(tar_header(toc_ti) + toc_json + tar_padding(len(toc_json)) + TAR_TRAILER)
    gz.close_member()
    blob = bytes(gz.out) + footer_bytes(toc_off)
    return EstargzLayer(
        blob=blob,
        toc_json=toc_json,
        toc_digest=toc_digest(toc_json),
        diff_id="sha256:" + gz.diff.hexdigest(),
        uncompressed_size=gz.usize,
    )
