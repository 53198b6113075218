"""Garbage collection of layers no image needs and no container is using.

A layer is kept while any image record (images/*.cbor) lists it, while its tree is a
lowerdir of an overlay mount in any mount namespace we can see (a running container whose
image was removed keeps working), or while a podman layer uses it through the layer store
that pulls on lookup (`shim.store.als.used_layers`).  Collection holds the store's "gc" lock exclusively;
pulls hold it shared, so a layer that a pull has just made but not yet recorded in an
image is never collected under it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .als import used_layers
from .blobs import forget_blob
from .layout import Store, digest_dirname
from .layouts import layout_of
from .metadata import load_image
from .mounts import overlay_mounts


def referenced_layers(store: Store) -> set[str]:
    """Layer dir names (`sha256-<hex>`) listed by any image record."""
    from .layout import digest_dirname

    out: set[str] = set()
    for f in store.images.glob("*.cbor"):
        try:
            rec = load_image(f.read_bytes())
        except Exception:  # an unreadable record: keep everything it might have named
            return {p.name for p in store.layers.iterdir()}
        out.update(digest_dirname(d) for d in rec.layers)
    return out


def mounted_layers(store: Store) -> set[str]:
    """Layer dir names whose tree is a lowerdir of an overlay mount (all visible namespaces).

    The store's own read-only views (v2's podman `diff` dirs) do not count: they are mounted
    for as long as the layer exists; podman's overlays above them do."""
    from .layouts import layer_of_lowerdir, view_root

    seen_ns: set[str] = set()
    texts: list[str] = []
    for pid in ["self", *(p for p in os.listdir("/proc") if p.isdigit())]:
        try:
            ns = os.readlink(f"/proc/{pid}/ns/mnt")
            if ns in seen_ns:
                continue
            texts.append(Path(f"/proc/{pid}/mountinfo").read_text())
            seen_ns.add(ns)
        except OSError:
            continue
    root = os.path.realpath(store.root)
    views = os.path.realpath(view_root(store)) + "/"
    out: set[str] = set()
    for text in texts:
        for target, lowers in overlay_mounts(text):
            if target.startswith(views):
                continue
            for low in lowers:
                hit = layer_of_lowerdir(low)
                if hit is not None and os.path.realpath(hit[0]) == root:
                    out.add(digest_dirname(hit[1]))
    return out


def collect_data(store: Store) -> tuple[int, int]:
    """Delete file data (v2's objects) that no layer left in the store names: (files, bytes)."""
    if not store.layers.is_dir():
        return 0, 0
    with store.lock("gc"):
        return layout_of(store).collect_data()


def evict_data(store: Store, max_bytes: int):
    """Evict least recently used file data no mounted layer names, down to max_bytes
    (`shim.store.evict`); None where the layout keeps data in its trees (v1)."""
    from .evict import evict_to

    if layout_of(store).name != "v2":
        return None
    if not store.layers.is_dir():
        from .evict import Eviction

        return Eviction()
    with store.lock("gc"):
        return evict_to(store, max_bytes, mounted_layers(store))


def collect(store: Store, keep_digests: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Delete layer dirs no image lists, no overlay mounts and `keep_digests` (an owner outside
    the image records, e.g. containerd's snapshotter) does not name; return the names deleted."""
    removed: list[str] = []
    if not store.layers.is_dir():
        return removed
    with store.lock("gc"):
        keep = (referenced_layers(store) | mounted_layers(store) | used_layers(store)
                | {digest_dirname(d) for d in keep_digests})
        for d in sorted(store.layers.iterdir()):
            if d.name in keep or not d.is_dir():
                continue
            with store.lock(d.name):
                layout_of(store).forget(d.name.replace("-", ":", 1))
                forget_blob(store, d.name.replace("-", ":", 1))
                # Move it out of layers/ first: a crash mid-delete leaves no half layer behind.
                trash = store.tmp / f"gc-{d.name}.{os.getpid()}"
                os.rename(d, trash)
                shutil.rmtree(trash, ignore_errors=True)
                removed.append(d.name)
            # The lock file stays: a waiter may hold the old inode, and a new file would let a
            # second builder in beside it.
    return removed
