"""Per-layer and per-image metadata, stored as CBOR.

The supervisor loads a layer's metadata at every container start, so entries are encoded
as positional arrays (compact, fast to decode with cbor2's C extension), not as maps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import cbor2

from ..errors import LazyshimError
from ..formats.toc import Chunk, Entry, Toc

META_VERSION = 1


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
    inodes: list[int] = field(default_factory=list)
    toc_digest: str | None = None
    complete: bool = False  # legacy layers: unpacked in full, nothing to fill
    registry: str = ""  # where its missing content is fetched from
    repository: str = ""


def _entry_to_list(e: Entry) -> list:
    return [
        e.name, e.type, e.mode, e.uid, e.gid, e.size, e.mtime, e.link, e.dev_major, e.dev_minor,
        e.xattrs or None, e.digest,
        [[c.offset, c.end, c.inner_offset, c.file_offset, c.size, c.digest, c.zeros] for c in e.chunks] or None,
    ]


def _entry_from_list(v: list) -> Entry:
    (name, typ, mode, uid, gid, size, mtime, link, major, minor, xattrs, digest, chunks) = v
    return Entry(
        name=name, type=typ, mode=mode, uid=uid, gid=gid, size=size, mtime=mtime, link=link,
        dev_major=major, dev_minor=minor, xattrs=xattrs or {}, digest=digest,
        chunks=[Chunk(*c) for c in chunks] if chunks else [],
    )


def dump_layer(meta: LayerMeta) -> bytes:
    return cbor2.dumps({
        "v": META_VERSION,
        "digest": meta.digest,
        "format": meta.format,
        "blob_size": meta.blob_size,
        "toc_digest": meta.toc_digest,
        "complete": meta.complete,
        "prioritized": meta.toc.prioritized,
        "no_prefetch": meta.toc.no_prefetch,
        "entries": [_entry_to_list(e) for e in meta.toc.entries],
        "inodes": meta.inodes,
        "registry": meta.registry,
        "repository": meta.repository,
    })


def load_layer(data: bytes) -> LayerMeta:
    try:
        d = cbor2.loads(data)
        if d.get("v") != META_VERSION:
            raise LazyshimError(f"layer metadata version {d.get('v')!r} is not supported; re-pull the image")
        toc = Toc(
            entries=[_entry_from_list(v) for v in d["entries"]],
            prioritized=d["prioritized"],
            no_prefetch=d["no_prefetch"],
        )
        return LayerMeta(
            digest=d["digest"], format=d["format"], blob_size=d["blob_size"], toc=toc,
            inodes=d["inodes"], toc_digest=d["toc_digest"], complete=d["complete"],
            registry=d["registry"], repository=d["repository"],
        )
    except (cbor2.CBORDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
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
