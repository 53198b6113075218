"""Store layout v2: every lazy layer's tree is metadata only, on one store-wide tmpfs.

    STORE/meta/                      a tmpfs (one for the whole store: overlayfs needs all of a
                                     mount's metadata layers on file systems it can tell apart,
                                     and one tmpfs is one inode space)
    STORE/meta/<alg>-<hex>/tree/     the layer's tree: dirs, symlinks, devices, whiteouts, modes,
                                     owners, xattrs, mtimes; regular files with content are
                                     metacopy files whose redirect names their data object
    STORE/meta/<alg>-<hex>/inodes    per entry, the inode of its file in tree/ (u64s, for the supervisor)
    STORE/meta/<alg>-<hex>/view/     podman's `diff`: a read-only overlay of tree::STORE/data
    STORE/data/                      the data-only lower layer (`shim.store.objects`)

The metadata under layers/ (record and entry table) stays the source of truth: a tree lost
with the tmpfs (a reboot, an unmount) is rebuilt from it by the next pull or mount at no refetch, since
the objects are on disk.  A tree is built in a staging name on the tmpfs and renamed into
place, so `meta/<alg>-<hex>` exists only complete.  Legacy (non-lazy) layers keep their full
tree on disk under layers/, as in v1.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LazyshimError
from .layout import digest_dirname
from .layouts import META_DIR, LayerLayout, MountSpec, load_meta, read_inodes, write_inodes
from .marks import filled_map_path
from .metadata import LayerMeta
from .sysmount import MS_RDONLY, detach, mount

if TYPE_CHECKING:  # the fill machinery only once something fills: not for mounting or checking
    from ..formats.toc import Entry
    from .filler import BlobSource, LayerFiller

_META = META_DIR
_DATA = "data"
_TREE = "tree"
_VIEW = "view"
_INODES = "inodes"
#: overlay options every mount of metadata trees over the data layer needs
OVERLAY_OPTIONS = ("metacopy=on", "redirect_dir=on")


def layer_of_metadir(p: Path) -> tuple[Path, str] | None:
    """(store root, layer dir name) for `STORE/meta/<name>/tree` or `.../view`, else None."""
    if p.name in (_TREE, _VIEW) and p.parent.parent.name == _META:
        return p.parent.parent.parent, p.parent.name
    return None


class MetaLayout(LayerLayout):
    name = "v2"

    def __init__(self, store) -> None:
        super().__init__(store)
        self.meta_root = store.root / _META
        self.data_root = store.root / _DATA
        self._recovered = False

    def populate(self, meta: LayerMeta, staging: Path, opts) -> None:
        """Build the tree in memory now (the caller holds the layer's lock), so a TOC the tree
        refuses fails the pull before the layer dir exists; on disk only the metadata."""
        meta.inodes = []
        self._ensure_tmpfs()
        self._build_unlocked(meta)

    def _is_disk_tree(self, digest: str) -> bool:
        return (self.store.layer_dir(digest) / _TREE).is_dir()  # legacy: unpacked in full

    def lower_dir(self, digest: str) -> Path:
        if self._is_disk_tree(digest):
            return self.store.layer_dir(digest) / _TREE
        return self.meta_root / digest_dirname(digest) / _TREE

    def activate(self, digest: str, meta: LayerMeta | None = None) -> None:
        name = digest_dirname(digest)
        if (self.meta_root / name).is_dir() and os.path.ismount(self.meta_root):
            return
        if self._is_disk_tree(digest):
            return
        self._ensure_tmpfs()
        with self.store.lock(name):
            self._build_unlocked(meta or load_meta(self.store, digest))

    def _build_unlocked(self, meta: LayerMeta) -> None:
        """Build the layer's tree on the tmpfs (the caller holds the layer's lock and has
        mounted the tmpfs).  If the tmpfs is unmounted under the build (an admin, a cleanup
        of another store gone wrong), the half-built tree went with it: build again once on
        a fresh tmpfs, and never on the disk dir below the mount point."""
        lost: BaseException | None = None
        for attempt in range(2):
            if attempt:
                self._ensure_tmpfs()
            tmpfs = self._tmpfs_dev()
            try:
                self._build_once(meta, tmpfs)
                return
            except (OSError, LazyshimError) as e:
                if tmpfs is not None and self._tmpfs_dev() == tmpfs:
                    raise  # the tmpfs stayed: a real error of this build
                lost = e
        raise LazyshimError(f"the store's metadata tmpfs {self.meta_root} was unmounted twice while the tree of "
                            f"layer {meta.digest[:19]} was built") from lost

    def _tmpfs_dev(self) -> int | None:
        """The device of the metadata tmpfs now, or None if it is not mounted."""
        if not os.path.ismount(self.meta_root):
            return None
        try:
            return os.stat(self.meta_root).st_dev
        except OSError:
            return None

    def _build_once(self, meta: LayerMeta, tmpfs: int | None) -> None:
        name = digest_dirname(meta.digest)
        final = self.meta_root / name
        if tmpfs is None:
            raise LazyshimError(f"the store's metadata tmpfs {self.meta_root} is not mounted")
        if final.is_dir():
            return
        for stale in self.meta_root.glob(f".{name}.*"):  # a build that died half-way
            shutil.rmtree(stale, ignore_errors=True)
        staging = self.meta_root / f".{name}.{os.getpid()}"
        (staging / _TREE).mkdir(parents=True)
        try:
            self._build(meta, staging)
            if os.stat(staging).st_dev != tmpfs:
                raise LazyshimError(f"the store's metadata tmpfs {self.meta_root} was unmounted during a build")
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def _build(self, meta: LayerMeta, staging: Path) -> None:
        from .objects import object_name
        from .placeholders import TreeOptions, build_tree

        digest = meta.digest

        def redirect(i: int, e: Entry) -> dict[str, bytes] | None:
            obj = object_name(digest, i, e)
            if obj is None:
                return None  # an empty file is all metadata
            return {"trusted.overlay.metacopy": b"", "trusted.overlay.redirect": b"/" + obj.encode()}

        try:
            inodes = build_tree(meta.toc, staging / _TREE, TreeOptions(privileged=True), own_xattrs=redirect)
        except OSError as e:
            raise LazyshimError(f"building the metadata tree of layer {digest[:19]}: {e.strerror}") from e
        write_inodes(staging / _INODES, inodes)

    def _ensure_tmpfs(self) -> None:
        if os.path.ismount(self.meta_root):
            return
        with self.store.lock(_META):
            if os.path.ismount(self.meta_root):
                return
            self.meta_root.mkdir(mode=0o711, exist_ok=True)
            self.data_root.mkdir(mode=0o700, exist_ok=True)
            mount("tmpfs", self.meta_root, "tmpfs", "mode=0711")

    def mount_spec(self, digests: list[str]) -> MountSpec:
        for d in digests:
            self.activate(d)
        lazy = [d for d in digests if not self._is_disk_tree(d)]
        if not lazy:
            return MountSpec([self.lower_dir(d) for d in digests])
        self.data_root.mkdir(mode=0o700, exist_ok=True)
        return MountSpec([self.lower_dir(d) for d in digests], [self.data_root], OVERLAY_OPTIONS)

    def layer_view(self, digest: str) -> Path:
        """A read-only overlay of the layer's tree over the data layer: podman and containerd
        stack their own overlay on such dirs, and this one fails to open an unfilled file
        instead of serving zeros."""
        if self._is_disk_tree(digest):
            return self.lower_dir(digest)
        self.activate(digest)
        view = self.meta_root / digest_dirname(digest) / _VIEW
        with self.store.lock(digest_dirname(digest)):
            if not os.path.ismount(view):
                view.mkdir(exist_ok=True)
                self.data_root.mkdir(mode=0o700, exist_ok=True)
                opts = f"lowerdir={_escape(self.lower_dir(digest))}::{_escape(self.data_root)}," \
                       + ",".join(OVERLAY_OPTIONS)
                mount("overlay", view, "overlay", opts, MS_RDONLY)
        return view

    def inodes(self, digest: str, meta: LayerMeta) -> Sequence[int]:
        if self._is_disk_tree(digest):
            return super().inodes(digest, meta)
        self.activate(digest, meta)
        path = self.meta_root / digest_dirname(digest) / _INODES
        try:
            inodes = read_inodes(path, digest)
        except LazyshimError:
            inodes = _cbor_inodes(path)  # a tree an older version built (CBOR): still valid
        if len(inodes) != len(meta.toc.entries):
            inodes = _cbor_inodes(path)
        if len(inodes) != len(meta.toc.entries):
            raise LazyshimError(f"metadata tree of layer {digest[:19]} does not match its metadata")
        return inodes

    def filler(self, digest: str, meta: LayerMeta, source_factory: Callable[[], BlobSource]) -> LayerFiller:
        self.data_root.mkdir(mode=0o700, exist_ok=True)
        if not self._recovered:
            from .objects import recover_unflushed

            recover_unflushed(self.store.tmp, self._collect_unmarked)
            self._recovered = True
        from .objects import ObjectFiller

        return ObjectFiller(self.store.layer_dir(digest), meta, source_factory, self.data_root, self.store.tmp)

    def _collect_unmarked(self) -> tuple[int, int]:
        """Delete every object no layer marks filled (after a boot that may not have flushed)."""
        from .objects import collect_unnamed, table_object_name

        names = set()
        for d in sorted(self.store.layers.iterdir()):
            try:
                meta = load_meta(self.store, d.name.replace("-", ":", 1))
                marks = filled_map_path(d).read_bytes()
            except (LazyshimError, OSError):
                continue  # a layer being deleted: it names nothing
            for i in meta.table.data_files():
                if i < len(marks) and marks[i]:
                    names.add(table_object_name(meta.digest, meta.table, i))
        return collect_unnamed(self.data_root, self.store.tmp, names)

    def collect_data(self) -> tuple[int, int]:
        from .objects import collect_unnamed, table_object_name

        names = set()
        for d in sorted(self.store.layers.iterdir()):
            meta = load_meta(self.store, d.name.replace("-", ":", 1))
            names.update(table_object_name(meta.digest, meta.table, i) for i in meta.table.data_files())
        from .partials import collect

        files, size = collect_unnamed(self.data_root, self.store.tmp, names)
        pfiles, psize = collect(self.store, names)  # big files cached chunk by chunk
        return files + pfiles, size + psize

    def usage(self) -> dict[str, int]:
        import collections

        from .objects import table_object_name

        sizes: dict[str, int] = {}
        users: collections.Counter[str] = collections.Counter()
        files = 0
        for d in sorted(self.store.layers.iterdir()):
            meta = load_meta(self.store, d.name.replace("-", ":", 1))
            if meta.complete:
                continue
            for i in meta.table.data_files():
                name = table_object_name(meta.digest, meta.table, i)
                files += 1
                users[name] += 1
                sizes[name] = meta.table.size[i]
        present = {n for n in sizes if (self.data_root / n).is_file()}
        out = {"files": files, "filled": sum(users[n] for n in present),
               "data_bytes": sum(sizes[n] for n in present),
               "shared_bytes": sum(sizes[n] * (users[n] - 1) for n in present)}
        if os.path.ismount(self.meta_root):
            st = os.statvfs(self.meta_root)
            out["meta_inodes"] = st.f_files - st.f_ffree
            out["meta_bytes"] = (st.f_blocks - st.f_bfree) * st.f_frsize
        return out

    def forget(self, digest: str) -> None:
        d = self.meta_root / digest_dirname(digest)
        detach(d / _VIEW)
        shutil.rmtree(d, ignore_errors=True)


def _cbor_inodes(path: Path) -> Sequence[int]:
    """The inode list of a tree built before they were written as u64s, or [] (no match)."""
    import cbor2

    try:
        inodes = cbor2.loads(path.read_bytes())
    except (OSError, ValueError, cbor2.CBORDecodeError):
        return []
    return inodes if isinstance(inodes, list) and all(type(i) is int for i in inodes) else []


def _escape(p: Path) -> str:
    """overlay splits lowerdir on ':' and options on ','; store paths with them are escaped."""
    return str(p).replace("\\", "\\\\").replace(":", "\\:").replace(",", "\\,")
