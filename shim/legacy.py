"""Layers with no verifiable TOC (plain gzip/zstd tarballs): stream, verify, unpack.

Nothing of such a layer is lazy; we decompress while downloading and unpack as the bytes
arrive, and the tree is only moved into the store once the whole blob matched its digest
(the caller renames the staging dir), so an unverified byte is never served.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from .errors import LazyshimError
from .formats.toc import Entry, FormatError, Toc, normalize_name
from .registry.client import Descriptor, RegistryClient
from .registry.reference import Reference
from .store.metadata import LayerMeta
from .store.placeholders import TreeBuilder, TreeOptions

_TYPES = {
    tarfile.REGTYPE: "reg", tarfile.AREGTYPE: "reg", tarfile.CONTTYPE: "reg", tarfile.DIRTYPE: "dir",
    tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hardlink", tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block", tarfile.FIFOTYPE: "fifo",
}


class _Decompressed:
    """A read()-able view of the decompressed blob stream, for tarfile's stream mode."""

    def __init__(self, chunks: Iterator[bytes], media_type: str) -> None:
        self._chunks = chunks
        self._buf = bytearray()
        self._eof = False
        if "zstd" in media_type:
            import zstandard

            self._d = zstandard.ZstdDecompressor().decompressobj()
            self._gzip = False
        elif "gzip" in media_type or media_type.endswith("tar.gz"):
            self._d = zlib.decompressobj(wbits=31)
            self._gzip = True
        else:
            self._d = None
            self._gzip = False

    def _more(self) -> None:
        try:
            raw = next(self._chunks)
        except StopIteration:
            self._eof = True
            return
        if self._d is None:
            self._buf += raw
            return
        try:
            while raw:
                self._buf += self._d.decompress(raw)
                if self._gzip and self._d.eof:  # concatenated gzip members
                    raw = self._d.unused_data
                    self._d = zlib.decompressobj(wbits=31)
                else:
                    raw = b""
        except (zlib.error, Exception) as e:  # zstandard.ZstdError has no common base
            raise LazyshimError(f"corrupt layer data: {e}") from e

    def read(self, n: int = -1) -> bytes:
        while not self._eof and (n < 0 or len(self._buf) < n):
            self._more()
        if n < 0:
            n = len(self._buf)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out


def unpack_layer(client: RegistryClient, ref: Reference, desc: Descriptor, dest: Path,
                 opts: TreeOptions | None = None) -> LayerMeta:
    stream = client.stream_blob(ref.repository, desc.digest)
    entries = unpack_tar_stream(_Decompressed(stream, desc.media_type), dest, opts)
    for _ in stream:  # drain: the digest is checked when the iterator ends
        pass
    return LayerMeta(digest=desc.digest, format="legacy", blob_size=desc.size,
                     toc=Toc(entries=entries), inodes=[0] * len(entries), complete=True)


def unpack_tar_stream(fileobj, dest: Path, opts: TreeOptions | None = None) -> list[Entry]:
    """Unpack a tar stream into an overlay-form tree, with the same confinement rules as
    placeholder trees (it shares their builder)."""
    builder = TreeBuilder(dest, opts)
    entries: list[Entry] = []
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tf:
            for m in tf:
                e = _entry(m)
                if e is None:
                    continue
                builder.add(e)
                entries.append(e)
                if e.type == "reg" and e.size:
                    src = tf.extractfile(m)
                    assert src is not None
                    fd = builder.open_file(e)
                    try:
                        while block := src.read(1 << 20):
                            os.write(fd, block)
                        os.utime(fd, (e.mtime, e.mtime))
                    finally:
                        os.close(fd)
    except tarfile.TarError as err:
        builder.close()
        raise LazyshimError(f"corrupt layer tar: {err}") from err
    except BaseException:
        builder.close()
        raise
    builder.finish()
    return entries


def _entry(m: tarfile.TarInfo) -> Entry | None:
    typ = _TYPES.get(m.type)
    if typ is None:
        return None  # pax/gnu metadata records are consumed by tarfile itself
    try:
        name = normalize_name(m.name) if m.name not in (".", "./", "/") else ""
    except FormatError as e:
        raise LazyshimError(str(e)) from e
    e = Entry(name=name, type=typ, mode=m.mode & 0o7777, uid=m.uid, gid=m.gid,
              size=m.size if typ == "reg" else 0, mtime=int(m.mtime),
              dev_major=m.devmajor, dev_minor=m.devminor)
    if typ == "symlink":
        e.link = m.linkname
    elif typ == "hardlink":
        e.link = normalize_name(m.linkname)
    # An empty PAX value deletes the record (as Go's archive/tar reads it, so umoci/podman agree).
    xattrs = {k[len("SCHILY.xattr."):]: v.encode("utf-8", "surrogateescape")
              for k, v in (m.pax_headers or {}).items() if k.startswith("SCHILY.xattr.") and v != ""}
    e.xattrs = {k: v for k, v in xattrs.items() if not k.startswith(("trusted.overlay.", "user.overlay."))}
    return e
