"""One store interface, two on-disk layouts; nothing outside the store branches on which.

- **v1 (placeholder trees)**: each layer's tree on disk, regular files as sparse placeholders
  that a fill writes in place.  Works rootless (overlay `userxattr`) and on any kernel, but a
  pull creates one disk inode per entry, and a reader the supervisor does not see (`cat`
  under `lazyshim mount`, `podman cp`) reads an unfilled placeholder as zeros.
- **v2 (metadata in memory, data by digest)**: trees on one store-wide tmpfs, rebuilt from
  the layer metadata when missing; regular files are overlayfs metacopy files whose redirect
  names a data object (`shim.store.objects`) in a data-only lower layer.  An unfilled file
  fails to open for every reader.  Host root and overlayfs data-only lower layers only.

A store's layout is chosen once, when it is first used: `LAZYSHIM_STORE_LAYOUT=v1|v2` forces
one; otherwise v2 where a probe mount shows the kernel serves it (`shim.store.probe`), else v1.
A store that already holds layers without a recorded layout is v1.  The choice is recorded in
the store and kept.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LazyshimError
from .layout import Store, digest_dirname
from .metadata import LayerMeta, dump_layer, load_layer, write_atomic

if TYPE_CHECKING:  # the fill machinery only once something fills: not for mounting or checking
    from .filler import BlobSource, LayerFiller

LAYOUT_ENV = "LAZYSHIM_STORE_LAYOUT"
LAYOUTS = ("v1", "v2")
_LAYOUT_FILE = "layout"
_META_FILE = "meta.cbor"
_TABLE_FILE = "toc.table"  # the layer's TocTable, mapped read-only by every process
_INODES_FILE = "inodes"  # v1: per entry, its placeholder's inode (native u64s)
_TREE = "tree"
META_DIR = "meta"  # v2's store-wide tmpfs of metadata trees (shim.store.metatree)


def configured_layout() -> str | None:
    """The layout the environment forces, if any (the one place LAZYSHIM_STORE_LAYOUT is read)."""
    value = os.environ.get(LAYOUT_ENV, "").strip()
    if not value:
        return None
    if value not in LAYOUTS:
        raise LazyshimError(f"{LAYOUT_ENV}={value[:20]!r}: expected v1 or v2")
    return value


@dataclass(frozen=True)
class MountSpec:
    """What an overlay of some layers needs: lower dirs (bottom first), data-only lower dirs
    (after `::`), and extra mount options.  Plain overlay terms: no store path logic."""

    lowers: list[Path]
    data_lowers: list[Path] = field(default_factory=list)
    options: tuple[str, ...] = ()


class LayerLayout:
    """What the rest of lazyshim asks of a layer, whatever the layout."""

    name = ""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- building (pull) --
    def populate(self, meta: LayerMeta, staging: Path, opts) -> None:
        """Make a lazy layer's on-disk part in its staging dir (renamed into place after)."""
        raise NotImplementedError

    def activate(self, digest: str, meta: LayerMeta | None = None) -> None:
        """Make a pulled layer mountable (v2: its tree in memory, rebuilt if lost)."""

    # -- mounting --
    def lower_dir(self, digest: str) -> Path:
        raise NotImplementedError

    def mount_spec(self, digests: list[str]) -> MountSpec:
        for d in digests:
            self.activate(d)
        return MountSpec([self.lower_dir(d) for d in digests])

    def layer_view(self, digest: str) -> Path:
        """One directory that is this layer's whole tree, for engines that stack their own
        overlay from one dir per layer (podman's layer store `diff`, containerd's snapshotter).
        v2: a read-only overlay of the metadata tree over the data objects (fail closed)."""
        return self.lower_dir(digest)

    # -- filling --
    def inodes(self, digest: str, meta: LayerMeta) -> Sequence[int]:
        """Per entry, the inode of its file in the layer's tree (0: none to fill)."""
        if meta.inodes:  # a record written before tables, or a layer being built
            return meta.inodes
        inodes = read_inodes(self.store.layer_dir(digest) / _INODES_FILE, digest)
        if len(inodes) != len(meta.toc.entries):
            raise LazyshimError(f"layer {digest[:19]}: its inode list does not match its metadata")
        return inodes

    def filler(self, digest: str, meta: LayerMeta, source_factory: Callable[[], BlobSource]) -> LayerFiller:
        from .filler import LayerFiller

        return LayerFiller(self.store.layer_dir(digest), meta, source_factory)

    # -- collecting and accounting --
    def forget(self, digest: str) -> None:
        """Drop what the layout keeps of a layer outside its layer dir (before it is deleted)."""

    def collect_data(self) -> tuple[int, int]:
        """Delete file data no layer of the store names (caller holds the gc lock exclusively);
        returns (files, bytes) deleted."""
        return 0, 0

    def usage(self) -> dict[str, int]:
        """Figures for `lazyshim df`: what the layers' file data takes, and what is shared."""
        files = filled = filled_bytes = 0
        for d in sorted(self.store.layers.iterdir()) if self.store.layers.is_dir() else []:
            meta = read_meta(d)
            if meta.complete:
                continue
            marks = (d / "filled").read_bytes()
            sizes = meta.table.size
            for i in meta.table.data_files():
                files += 1
                if marks[i]:
                    filled += 1
                    filled_bytes += sizes[i]
        return {"files": files, "filled": filled, "data_bytes": filled_bytes, "shared_bytes": 0}


class PlaceholderLayout(LayerLayout):
    """v1: `layers/<alg>-<hex>/tree`, sparse placeholders filled in place."""

    name = "v1"

    def populate(self, meta: LayerMeta, staging: Path, opts) -> None:
        from .placeholders import build_tree

        (staging / _TREE).mkdir()
        meta.inodes = build_tree(meta.toc, staging / _TREE, opts)

    def lower_dir(self, digest: str) -> Path:
        return self.store.layer_dir(digest) / _TREE


def layout_of(store: Store) -> LayerLayout:
    """The store's layout (decided, and recorded, on first use)."""
    cached = getattr(store, "_layout_impl", None)
    if cached is not None:
        return cached
    with _DECIDE_LOCK:  # a pull's layer threads ask at once: one records the layout (one temp name)
        cached = getattr(store, "_layout_impl", None)
        if cached is not None:
            return cached
        name = _decide(store)
        if name == "v2":
            from .metatree import MetaLayout

            impl: LayerLayout = MetaLayout(store)
        else:
            impl = PlaceholderLayout(store)
        store._layout_impl = impl
        return impl


_DECIDE_LOCK = threading.Lock()


def _decide(store: Store) -> str:
    forced = configured_layout()
    record = store.root / _LAYOUT_FILE
    try:
        recorded = record.read_text().strip()
    except FileNotFoundError:
        recorded = None
    except OSError as e:
        raise LazyshimError(f"cannot read {record}: {e.strerror}") from e
    if recorded is not None:
        if recorded not in LAYOUTS:
            raise LazyshimError(f"{record}: unknown store layout {recorded[:20]!r}")
        if forced is not None and forced != recorded:
            raise LazyshimError(f"store {store.root} uses layout {recorded}; {LAYOUT_ENV}={forced} needs another "
                                "LAZYSHIM_ROOT")
        return recorded
    store.ensure()
    if forced is not None:
        name = forced
    elif any(store.layers.iterdir()):
        name = "v1"  # made before layouts were recorded
    else:
        from .probe import data_only_lowers_work

        name = "v2" if data_only_lowers_work(store.tmp) else "v1"
    if name == "v2":
        from ..userns import host_root

        if not host_root():
            raise LazyshimError(f"{LAYOUT_ENV}=v2 needs host root (overlay metacopy reads trusted.* xattrs)")
    write_atomic(record, name.encode() + b"\n")
    return name


def load_meta(store: Store, digest: str) -> LayerMeta:
    """A pulled layer's metadata, or a one-line error naming the layer."""
    try:
        return read_meta(store.layer_dir(digest))
    except FileNotFoundError as e:
        raise LazyshimError(f"layer {digest[:19]} is not in the store {store.root}") from e


def read_meta(layer_dir: Path) -> LayerMeta:
    """A layer dir's metadata; its entries are a table over a read-only map of the layer's
    table file (shared with every other process of the store), not a decoded copy."""
    record = (layer_dir / _META_FILE).read_bytes()
    from .metadata import META_VERSION, record_version

    if record_version(record) != META_VERSION:
        return load_layer(record)  # written before tables (or damaged: a one-line error)
    import mmap

    from ..formats.toc import FormatError
    from ..formats.toctable import TocTable

    try:
        with open(layer_dir / _TABLE_FILE, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        table = TocTable.from_buffer(mapped)
    except (OSError, ValueError, FormatError) as e:  # ValueError: an empty file cannot be mapped
        raise LazyshimError(f"layer {layer_dir.name[:19]}: its entry table is damaged: {e}") from e
    return load_layer(record, table)


def write_meta(layer_dir: Path, meta: LayerMeta) -> None:
    """Write a layer's metadata into its fresh staging dir (renamed into place after), made
    durable with one flush of the file system instead of one per file."""
    from .filler import sync_dir

    (layer_dir / _TABLE_FILE).write_bytes(meta.table.to_bytes())
    if meta.inodes:
        write_inodes(layer_dir / _INODES_FILE, meta.inodes)
    (layer_dir / _META_FILE).write_bytes(dump_layer(meta))
    sync_dir(layer_dir)


def read_inodes(path: Path, digest: str) -> Sequence[int]:
    """A list of native u64 inode numbers written by `write_inodes`."""
    from array import array

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LazyshimError(f"layer {digest[:19]}: cannot read its inode list: {e.strerror}") from e
    if len(raw) % 8:
        raise LazyshimError(f"layer {digest[:19]}: its inode list is damaged")
    out = array("Q")
    out.frombytes(raw)
    return out


def write_inodes(path: Path, inodes: Sequence[int]) -> None:
    from array import array

    path.write_bytes(array("Q", inodes).tobytes())


def release(store: Store) -> None:
    """Detach every mount the store made (v2's metadata tmpfs and the views on it), before a
    throw-away store is deleted; running containers keep what they use."""
    from .sysmount import detach

    detach(store.root / META_DIR)


def view_root(store: Store) -> Path:
    """Where the store mounts its own overlays (v2's read-only podman views): not a user's."""
    return store.root / META_DIR


def disk_tree(layer_dir: Path) -> Path:
    """A layer dir's full tree on disk (v1's placeholder trees; legacy layers in both layouts)."""
    return layer_dir / _TREE


def has_meta(layer_dir: Path) -> bool:
    return (layer_dir / _META_FILE).exists()


def meta_path(layer_dir: Path) -> Path:
    return layer_dir / _META_FILE


def layer_of_lowerdir(lowerdir: str) -> tuple[Path, str] | None:
    """(store root, layer digest) for an overlay lower dir that is one of a store's layers, in
    either layout (real paths, as mountinfo gives them after resolving), or None."""
    p = Path(lowerdir)
    if p.name == _TREE and p.parent.parent.name == "layers":
        root, name = p.parent.parent.parent, p.parent.name
    else:
        from .metatree import layer_of_metadir

        hit = layer_of_metadir(p)
        if hit is None:
            return None
        root, name = hit
    alg, _, hexpart = name.partition("-")
    digest = f"{alg}:{hexpart}"
    try:
        if digest_dirname(digest) != name:
            return None
    except LazyshimError:
        return None
    if not has_meta(root / "layers" / name):
        return None
    return root, digest
