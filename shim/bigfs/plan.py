"""Which files of a container's layers the FUSE layer serves (and whether it is needed)."""

from __future__ import annotations

from dataclasses import dataclass

from ..store.layout import Store
from ..store.metadata import LayerMeta
from . import is_big


@dataclass(frozen=True)
class Served:
    """One big file: its object name, the layer that holds it and its entry index."""

    name: str
    meta: LayerMeta
    idx: int


def served(store: Store, layers: list[str], limit: int) -> list[Served]:
    """The big files of the lazy layers whose object the data layer does not hold yet (in
    layout v2 only: placeholder trees fill big files whole).  One per object name; a name two
    entries claim with different sizes or chunks is served by none (their opens fail: the
    supervisor leaves big files to this layer), so no file reads another's bytes."""
    from ..store.layouts import layout_of, load_meta
    from ..store.partials import largest_chunked, object_path

    if not limit or layout_of(store).name != "v2":
        return []
    out: dict[str, Served] = {}
    conflicts: set[str] = set()
    for digest in layers:
        if largest_chunked(store, digest, lambda d=digest: largest(load_meta(store, d))) < limit:
            continue
        from ..store.objects import object_name  # only for a layer that has a big file

        meta = load_meta(store, digest)
        for i, e in enumerate(meta.toc.entries):
            if not is_big(e, limit):
                continue
            name = object_name(digest, i, e)
            if name is None or name in conflicts:
                continue
            if name in out:
                first = out[name].meta.toc.entries[out[name].idx]
                if _shape(first) != _shape(e):
                    conflicts.add(name)  # one digest, two contents: a lying TOC, served by neither
                continue
            try:
                if object_path(store, name).stat().st_size == e.size:
                    continue  # complete: read natively
            except OSError:
                pass
            out[name] = Served(name, meta, i)
    return [s for n, s in out.items() if n not in conflicts]


def _shape(e) -> tuple:
    """What must agree between two entries that share an object name for either to serve it."""
    return e.size, tuple((c.file_offset, c.size, c.digest, c.zeros) for c in e.chunks)


def largest(meta: LayerMeta) -> int:
    """The size of the largest file of the layer that is big at any threshold (0: none)."""
    if meta.complete:
        return 0
    return max((e.size for e in meta.toc.entries if is_big(e, 1)), default=0)
