"""A disk cap for file data: evict the least recently used data objects (store layout v2).

Only objects that no mounted layer names may go.  A running container's overlay (or a
podman/containerd overlay above a layer view) reaches an object through a metacopy
redirect, and its supervisor answers an open of a file it has seen filled without looking
again: deleting that object would fail the open.  Objects of layers no overlay uses are
only a cache of verified registry bytes; evicting one costs a refetch on the next fill.

Order of work per object, so that a crash at any point leaves a store that is right:
first the layer's `complete` mark goes (a runtime would otherwise start a container of it
without a supervisor), then the object's byte-map marks, then the object.  A crash after the
marks but before the unlink leaves an object no mark names, which the next fill finds by
its name and re-marks (`ObjectFiller.is_filled`).

Least recently used is read from the object's atime, which the kernel moves at most once a
day under `relatime`: a day-old object goes before one read this morning, and within a day
the larger objects go first (fewer files to refetch for the same space).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .filler import COMPLETE_MARK, filled_map_path
from .layout import Store
from .layouts import layout_of, load_meta
from .objects import object_name

_DAY = 86400


@dataclass
class Eviction:
    files: int = 0
    bytes: int = 0
    kept_bytes: int = 0  # data left on disk (mounted layers' objects included)
    pinned_bytes: int = 0  # data that mounted layers name, which no cap evicts


@dataclass
class _Object:
    name: str
    size: int
    atime: float
    users: list[tuple[str, int]]  # (layer dir name, entry index)


def evict_to(store: Store, max_bytes: int, mounted: set[str]) -> Eviction:
    """Delete data objects, least recently used first, until the data takes <= max_bytes.

    `mounted`: layer dir names some overlay uses (`gc.mounted_layers`); their objects stay.
    The caller holds the store's gc lock exclusively (no pull adds a layer meanwhile)."""
    layout = layout_of(store)
    out = Eviction()
    if layout.name != "v2" or not store.layers.is_dir():
        return out
    data_root: Path = layout.data_root  # type: ignore[attr-defined]
    objects: dict[str, _Object] = {}
    pinned: set[str] = set()
    for d in sorted(store.layers.iterdir()):
        if not d.is_dir():
            continue
        meta = load_meta(store, d.name.replace("-", ":", 1))
        if meta.complete:  # a legacy layer unpacked in full: its files are not objects
            continue
        for i, e in enumerate(meta.toc.entries):
            name = object_name(meta.digest, i, e)
            if name is None:
                continue
            if d.name in mounted:
                pinned.add(name)
            obj = objects.get(name)
            if obj is None:
                try:
                    st = os.stat(data_root / name)
                except OSError:
                    continue  # not filled
                obj = objects[name] = _Object(name, st.st_size, st.st_atime, [])
            obj.users.append((d.name, i))
    total = sum(o.size for o in objects.values())
    out.pinned_bytes = sum(objects[n].size for n in pinned if n in objects)
    victims: list[_Object] = []
    for obj in sorted((o for o in objects.values() if o.name not in pinned),
                      key=lambda o: (int(o.atime // _DAY), -o.size)):
        if total <= max_bytes:
            break
        victims.append(obj)
        total -= obj.size
    _drop_complete_marks(store, {name for o in victims for name, _ in o.users})
    for obj in victims:
        for name, idx in obj.users:
            _clear_mark(store.layers / name, idx)
        try:
            os.unlink(data_root / obj.name)
        except OSError:
            total += obj.size
            continue
        out.files += 1
        out.bytes += obj.size
    out.kept_bytes = total
    return out


def _drop_complete_marks(store: Store, layer_names: set[str]) -> None:
    """Durably, before any object goes: a layer that keeps its mark would run unsupervised."""
    for name in sorted(layer_names):
        layer_dir = store.layers / name
        with store.lock(name):
            try:
                (layer_dir / COMPLETE_MARK).unlink()
            except FileNotFoundError:
                continue
            fd = os.open(layer_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _clear_mark(layer_dir: Path, idx: int) -> None:
    """Zero one byte of the layer's byte map (shared with every process that has it mapped).

    Not synced: a mark that survives a crash while its object is gone is dropped when the
    layer is next opened for filling (`ObjectFiller._check_marks`), so it costs a refetch."""
    try:
        fd = os.open(filled_map_path(layer_dir), os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if idx < os.fstat(fd).st_size:
            os.pwrite(fd, b"\0", idx)
    finally:
        os.close(fd)
