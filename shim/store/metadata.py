"""Per-layer and per-image metadata: small CBOR records, and each layer's TOC as a table.

The supervisor of every container loads its layers' metadata, so the entries are not in the
CBOR record (version 2): they are the layer's `TocTable`, which the store keeps in a file of
its own and maps read-only (`shim.store.layouts`), one copy in the page cache for every
process.  Records of version 1 (entries as positional CBOR arrays, from stores written
before tables) still load: their entries are turned into a table in memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cbor2

from ..errors import LazyshimError
from ..formats.toc import Chunk, Entry, FormatError, Toc
from ..formats.toctable import TocTable

META_VERSION = 2
#: Records with their entries inline, as written before tables; read, never written.
_INLINE_VERSION = 1


@dataclass(slots=True)
class LayerMeta:
    """What the store knows about one layer blob.

    `inodes[i]` is the inode number of entry i's placeholder in the tree (0 if it has
    none); the supervisor maps a trapped file to its entry by inode, which overlayfs
    passes through from lower layers on a single filesystem.
    """

    digest: str
    format: str  # "estargz" | "zstd:chunked" | "legacy"
    blob_size: int
    toc: Toc
    inodes: Sequence[int] = field(default_factory=list)
    toc_digest: str | None = None
    complete: bool = False  # legacy layers: unpacked in full, nothing to fill
    registry: str = ""  # where its missing content is fetched from
    repository: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.toc.entries, TocTable):  # legacy layers and tests build lists
            self.toc.entries = TocTable.from_entries(self.toc.entries, self.toc.prioritized, self.toc.no_prefetch)

    @property
    def table(self) -> TocTable:
        """The entries as columns (what whole-layer questions are asked of)."""
        return self.toc.entries  # type: ignore[return-value]


def _entry_from_list(v: list) -> Entry:
    (name, typ, mode, uid, gid, size, mtime, link, major, minor, xattrs, digest, chunks) = v
    return Entry(
        name=name, type=typ, mode=mode, uid=uid, gid=gid, size=size, mtime=mtime, link=link,
        dev_major=major, dev_minor=minor, xattrs=xattrs or {}, digest=digest,
        chunks=[Chunk(*c) for c in chunks] if chunks else [],
    )


def dump_layer(meta: LayerMeta) -> bytes:
    """The layer's record without its entries (those are `meta.table.to_bytes()`)."""
    return cbor2.dumps({
        "v": META_VERSION,
        "digest": meta.digest,
        "format": meta.format,
        "blob_size": meta.blob_size,
        "toc_digest": meta.toc_digest,
        "complete": meta.complete,
        "prioritized": meta.toc.prioritized,
        "no_prefetch": meta.toc.no_prefetch,
        "entries": len(meta.toc.entries),
        "registry": meta.registry,
        "repository": meta.repository,
    })


def record_version(data: bytes) -> int | None:
    """The version of a layer record, None if it is not one."""
    try:
        d = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, TypeError):
        return None
    return d.get("v") if isinstance(d, dict) else None


def load_layer(data: bytes, table: TocTable | None = None) -> LayerMeta:
    """A layer's metadata from its record and (version 2) its table; one-line errors."""
    try:
        d = cbor2.loads(data)
        v = d.get("v")
        if v == _INLINE_VERSION:
            toc = Toc(
                entries=TocTable.from_entries([_entry_from_list(e) for e in d["entries"]], d["prioritized"],
                                              d["no_prefetch"]),
                prioritized=d["prioritized"], no_prefetch=d["no_prefetch"],
            )
            inodes = d["inodes"]
        elif v == META_VERSION:
            if table is None:
                raise LazyshimError("layer metadata has no entry table")
            if len(table) != d["entries"] or table.prioritized != d["prioritized"]:
                raise LazyshimError("layer metadata does not match its entry table")
            toc = Toc(entries=table, prioritized=d["prioritized"], no_prefetch=d["no_prefetch"])
            inodes = []
        else:
            raise LazyshimError(f"layer metadata version {str(v)[:20]!r} is not supported; re-pull the image")
        return LayerMeta(
            digest=d["digest"], format=d["format"], blob_size=d["blob_size"], toc=toc,
            inodes=inodes, toc_digest=d["toc_digest"], complete=d["complete"],
            registry=d["registry"], repository=d["repository"],
        )
    except (cbor2.CBORDecodeError, FormatError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise LazyshimError(f"corrupt layer metadata: {e}") from e


@dataclass(slots=True)
class ImageRecord:
    """A pulled image: where it came from and which layers (bottom first) make its rootfs."""

    id: str  # manifest digest
    name: str  # the reference it was pulled as
    registry: str
    repository: str
    layers: list[str]  # compressed layer digests, bottom first
    config: dict  # the image config JSON
    config_digest: str


def dump_image(rec: ImageRecord) -> bytes:
    return cbor2.dumps({
        "v": META_VERSION, "id": rec.id, "name": rec.name, "registry": rec.registry,
        "repository": rec.repository, "layers": rec.layers, "config": rec.config,
        "config_digest": rec.config_digest,
    })


def load_image(data: bytes) -> ImageRecord:
    try:
        d = cbor2.loads(data)
        return ImageRecord(
            id=d["id"], name=d["name"], registry=d["registry"], repository=d["repository"],
            layers=list(d["layers"]), config=d["config"], config_digest=d["config_digest"],
        )
    except (cbor2.CBORDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise LazyshimError(f"corrupt image record: {e}") from e


def write_atomic(path: Path, data: bytes) -> None:
    """Write a small file so readers see the old or the new content, never a torn one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
