"""The lazy layers under one container's rootfs, indexed for the supervisor's hot path.

A trapped path is resolved by the kernel inside the container; overlayfs reports a lower
file's own inode number, so one search by inode tells whether the file is one of our
placeholders and which layer entry fills it.  The index is two sorted arrays (16 bytes a
file, searched with bisect), not a dict of tuples (about 150), and the entries themselves
stay in the layers' mapped tables: what a supervisor holds per file is a few bytes.
"""

from __future__ import annotations

import os
import stat
from array import array
from bisect import bisect_right
from collections.abc import Sequence
from pathlib import Path

from .errors import LazyshimError
from .store.filler import SYNCER, BlobSource, LayerFiller, is_complete, mark_complete
from .store.layout import Store
from .store.layouts import layer_of_lowerdir, layout_of, load_meta


class LazyRoot:
    #: Set to a dict to learn a start-up profile: every image file looked up (by an open, an
    #: exec or a prefill; filled or not) becomes a key, first need first, up to `recording_cap`.
    recording: dict | None = None
    recording_cap = 0

    def __init__(self, store: Store, layer_digests: list[str], sources: Sequence[str] = (),
                 big_threshold: int = 0) -> None:
        """`sources`: references of the image(s) the container runs, where fills go first.
        `big_threshold`: files that big (`shim.bigfs.is_big`) are the container's FUSE layer's,
        never filled whole here (0: none is)."""
        self.fillers: list[LayerFiller] = []
        layout = layout_of(store)
        per_layer: list[Sequence[int]] = []
        self._metas = []  # every layer's metadata, bottom first (what shadows what)
        for digest in layer_digests:
            meta = load_meta(store, digest)
            self._metas.append(meta)
            if meta.complete:  # unpacked in full (legacy layer)
                mark_complete(store.layer_dir(digest))
                continue
            filler = layout.filler(digest, meta, _source_factory(store, sources, layer_digests, digest,
                                                                  meta.registry, meta.repository))
            self.fillers.append(filler)
            inodes: Sequence[int] = layout.inodes(digest, meta)
            sizes = meta.table.size
            if big_threshold and any(sizes[i] >= big_threshold for i in meta.table.data_files()):
                from .bigfs import is_big

                filler.served_elsewhere = {i for i in meta.table.data_files()
                                           if sizes[i] >= big_threshold and is_big(meta.table[i], big_threshold)}
                inodes = [0 if i in filler.served_elsewhere else ino for i, ino in enumerate(inodes)]
            per_layer.append(inodes)
        self._inodes, self._slots = _inode_index(per_layer)

    def entry_of_inode(self, ino: int) -> tuple[LayerFiller, int] | None:
        """(filler, entry index) of the lazy file with inode number `ino`, or None."""
        keys = self._inodes
        k = bisect_right(keys, ino) - 1  # the last of equal keys: an upper layer's, as a dict would keep
        if k < 0 or keys[k] != ino:
            return None
        slot = self._slots[k]
        return self.fillers[slot >> 32], slot & 0xFFFFFFFF

    def lookup(self, st: os.stat_result) -> tuple[LayerFiller, int] | None:
        """The unfilled placeholder behind a stat result, or None.

        When the overlay's layers are not all on one file system (a store on tmpfs under an
        upper dir on disk), overlayfs reports `real inode | fsid << (64 - xino bits)`: the
        low 32 bits are still the placeholder's own inode number."""
        hit = self.entry_of_inode(st.st_ino)
        if hit is None and st.st_ino >> 32:
            hit = self.entry_of_inode(st.st_ino & 0xFFFFFFFF)
        if hit is None:
            return None
        rec = self.recording
        if rec is not None and hit not in rec:
            rec[hit] = None
            if len(rec) >= self.recording_cap:
                self.recording = None
        filler, idx = hit
        if filler.meta.table.size[idx] != st.st_size or not stat.S_ISREG(st.st_mode) or filler.is_filled(idx):
            return None
        return filler, idx

    @property
    def metas(self) -> list:
        """Every layer's metadata, bottom first (lazy and complete layers alike)."""
        return self._metas

    def lookup_path(self, root_fd: int, path: bytes) -> tuple[LayerFiller, int] | None:
        """The unfilled placeholder at `path` inside the rootfs open at root_fd, or None
        (also when there is nothing there)."""
        from seccomp.resolve import O_PATH, RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, openat2

        try:
            fd = openat2(root_fd, path, O_PATH, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        except OSError:
            return None
        try:
            return self.lookup(os.fstat(fd))
        finally:
            os.close(fd)

    def fill_path(self, root_fd: int, path: str) -> bool:
        """Fill the file at `path` inside the rootfs open at root_fd; True if it was filled."""
        hit = self.lookup_path(root_fd, path.encode())
        if hit is None:
            return False
        hit[0].fill(hit[1])
        return True

    def check_rootfs(self, root_fd: int, probes: int = 8) -> None:
        """Refuse a rootfs whose lazy layers are not the trees this index was read from.

        The index maps inode numbers of the layers' trees; a tree rebuilt after the rootfs
        was mounted (the store's metadata tmpfs lost and made again) numbers its files anew,
        and then no file of the container would be known as ours: every unfilled one would
        open as ENOENT.  So, before the container starts, a few files of each lazy layer that
        no layer above holds are looked at through the rootfs; a layer none of whose probes
        is found, while some are lower files the index takes for other entries (or does not
        know, with overlayfs' xino bits set), is served from another tree."""
        from seccomp.resolve import O_PATH, RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, openat2

        above: set[str] = set()
        fillers = {id(f.meta): f for f in self.fillers}
        for meta in reversed(self._metas):
            if not fillers:
                return  # no lazy layer below: nothing left to check
            filler = fillers.pop(id(meta), None)
            if filler is not None:
                tried = seen = known = 0
                table = meta.table
                for i in table.data_files():
                    if tried >= probes:
                        break
                    name = table.name(i)
                    if name in above:
                        continue
                    try:
                        fd = openat2(root_fd, ("/" + name).encode(), O_PATH, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
                    except OSError:
                        continue  # hidden (a whiteout above) or removed: says nothing
                    try:
                        st = os.fstat(fd)
                    finally:
                        os.close(fd)
                    tried += 1
                    if not stat.S_ISREG(st.st_mode) or st.st_size != table.size[i]:
                        continue
                    hit = self.entry_of_inode(st.st_ino) or self.entry_of_inode(st.st_ino & 0xFFFFFFFF)
                    if hit is not None and hit[0] is filler and hit[1] == i:
                        known += 1
                        break
                    if hit is not None or st.st_ino >> 32:
                        seen += 1  # a lower file the index does not know as this entry
                    # else: most likely copied up into the container's upper dir: says nothing
                if seen and not known:
                    raise LazyshimError(f"the rootfs holds another tree of layer {meta.digest[:19]} than the store "
                                        "has now (its metadata was rebuilt after the rootfs was mounted): mount "
                                        "the rootfs again")
            above.update(meta.table.names())

    def prefetch_plan(self, everything: bool) -> list[tuple[LayerFiller, list[int], bool]]:
        """What background fetching fills, in order: every layer's prioritized files (those
        before its `.prefetch.landmark`; flagged True: the workload needs them now), then, if
        `everything`, all other files in TOC order."""
        first: list[tuple[LayerFiller, list[int], bool]] = []
        rest: list[tuple[LayerFiller, list[int], bool]] = []
        for f in self.fillers:
            regs = f.meta.table.data_files()
            if f.served_elsewhere:
                regs = [i for i in regs if i not in f.served_elsewhere]
            n = 0 if f.meta.toc.no_prefetch else f.meta.toc.prioritized
            if n:
                first.append((f, regs[:n], True))
            if everything and regs[n:]:
                rest.append((f, regs[n:], False))
        return first + rest

    def complete(self, recount: bool = True) -> bool:
        """Every file of every layer is filled: nothing is left for the supervisor to do but
        answer.  Recounts, so fills by other containers sharing the layers are seen; without
        `recount`, what the fillers counted (no file looked at: at a supervisor's start)."""
        if not recount:
            return all(not f.unfilled for f in self.fillers)
        for f in self.fillers:
            f.unfilled = f.count_unfilled()
            if f.unfilled:
                return False
            f.mark_complete()
        return True

    @staticmethod
    def flush() -> None:
        """Return once every file filled so far (by this process) is durable and marked in its
        layer's byte map, where other processes of the store see it."""
        SYNCER.flush()

    def stats(self) -> dict[str, int]:
        return {
            "files_filled": sum(f.files_filled for f in self.fillers),
            "bytes_fetched": sum(f.bytes_fetched for f in self.fillers),
            "range_requests": sum(f.requests for f in self.fillers),
        }


def _inode_index(per_layer: list[Sequence[int]]) -> tuple[array, array]:
    """Sorted inode numbers and, beside each, its file's `layer number << 32 | entry index`."""
    keys = array("Q")
    slots = array("Q")
    for layer, inodes in enumerate(per_layer):
        base = layer << 32
        for i, ino in enumerate(inodes):
            if ino:
                keys.append(ino)
                slots.append(base | i)
    order = sorted(range(len(keys)), key=keys.__getitem__)  # stable: equal inodes keep layer order
    return array("Q", [keys[k] for k in order]), array("Q", [slots[k] for k in order])


def _source_factory(store: Store, sources: Sequence[str], layers: list[str], digest: str,
                    first_registry: str, first_repository: str):
    """The layer's blob source, made on its first fill: the image's own registries (and
    mirrors), then the other images holding the layer, then where it was first pulled."""
    def make() -> BlobSource:
        from .sources import fill_sources

        return fill_sources(store, sources, layers).source(digest, first_registry, first_repository)

    return make


def layers_complete(store: Store, layer_digests: list[str]) -> bool:
    """Every file of every layer is filled: such a rootfs needs no supervisor at all."""
    return all(is_complete(store.layer_dir(d)) for d in layer_digests)


def overlay_lowerdirs(rootfs: Path | str) -> list[str]:
    """The real lower dirs (bottom first) of the overlay in effect at `rootfs`, or []."""
    from .store.mounts import overlay_mounts

    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError:
        return []
    target = os.path.realpath(rootfs)
    lowers: list[str] = []
    for mount_point, mount_lowers in overlay_mounts(text):
        if mount_point == target:
            lowers = mount_lowers  # the last mount on the target is the one in effect
    return lowers


def layers_of_rootfs(store: Store, rootfs: Path) -> list[str] | None:
    """The lazy layers an overlay rootfs is made of (from its mount options), or None."""
    root = os.path.realpath(store.root)
    out = []
    for low in overlay_lowerdirs(rootfs):
        hit = layer_of_lowerdir(low)
        if hit is not None and os.path.realpath(hit[0]) == root:
            out.append(hit[1])
    return out or None


def store_of_rootfs(rootfs: Path | str) -> Path | None:
    """The store whose layers an overlay rootfs is made of, whatever $LAZYSHIM_ROOT says (podman
    and containerd do not pass our environment on), or None."""
    for low in overlay_lowerdirs(rootfs):
        hit = layer_of_lowerdir(low)
        if hit is not None:
            return hit[0]
    return None
