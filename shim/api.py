"""What the runtime asks of the lazy image layer, in the runtime's own terms.

The runtime knows images as records with layer digests and trees on disk; it never sees
a wire format.  Keep this the only door between the two.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import LazyshimError
from .store.layout import Store
from .store.layouts import MountSpec
from .store.metadata import ImageRecord


def open_store(root: Path | None = None) -> Store:
    """The store, created if new, with its layout decided (a bad LAZYSHIM_STORE_LAYOUT fails here)."""
    from .store.layouts import layout_of

    store = Store(root)
    store.ensure()
    layout_of(store)
    return store


def release_store(root: Path) -> None:
    """Detach what a store has mounted (before deleting a scratch store)."""
    from .store.layouts import release

    release(Store(root))


def ensure_image(store: Store, name: str, pull: bool = True, always: bool = False,
                 progress: bool = False) -> ImageRecord:
    """The image from the store, pulled if missing (`pull`) or in any case (`always`);
    `progress` reports the pull's layers on stderr."""
    from .store.refs import resolve_image

    if not always:
        try:
            return resolve_image(store, name)
        except LazyshimError:
            if not pull:
                raise
    from .pull import pull as do_pull

    if progress:
        from .progress import Progress, pull_reporter

        return do_pull(name, store, progress=pull_reporter(Progress()))
    return do_pull(name, store)


def store_layout(store: Store) -> str:
    """Which on-disk layout the store uses (a store that knows better says so itself)."""
    from .store.layouts import layout_of

    name = layout_of(store).name
    return {"v1": "v1 (placeholder trees)", "v2": "v2 (metadata in memory, data by digest)"}.get(name, name)


def image_sources(store: Store, image: ImageRecord, asked: str | None = None) -> list[str]:
    """The references a container of `image` fills from (the supervisor's `--sources`);
    `asked`: the name the user gave, tried first."""
    from .store.refs import image_references  # not .sources: no HTTP client for a list of names

    return image_references(store, image, asked)


def profiles_enabled() -> bool:
    """Whether supervised runs learn and use start-up profiles (`profiles` on or off)."""
    from . import config
    from .store.profiles import enabled

    return enabled(config.get("profiles"))


def kept_profiles_note(store: Store) -> str | None:
    """What `rmi` and `gc` say about the profiles of removed images they keep, or None."""
    from .store import profiles

    n = profiles.of_removed_images(store)
    return profiles.KEPT_NOTE.format(n=n) if n else None


def layer_mount(store: Store, image: ImageRecord) -> MountSpec:
    """What an overlay of the image needs (lower dirs bottom first, data-only lower dirs, mount
    options), whatever the store's layout; trees lost with a reboot are rebuilt first."""
    from .store.layouts import layout_of

    return layout_of(store).mount_spec(image.layers)


def layer_trees(store: Store, image: ImageRecord) -> list[Path]:
    """The image's layer trees (overlay lower dirs), bottom layer first."""
    return layer_mount(store, image).lowers


@dataclass(frozen=True)
class FillResult:
    """What a full fill did: files written now (not those already filled) and bytes moved."""

    files_filled: int
    bytes_fetched: int
    seconds: float


# progress(files done, files to do, bytes fetched so far), called before every range request
# and once at the end.
FillProgress = Callable[[int, int, int], None]


def fill_image(store: Store, image_or_layers: ImageRecord | list[str],
               progress: FillProgress | None = None) -> FillResult:
    """Fill every file of an image (or of these layer digests) now, verified, in coalesced
    range requests; the one door for `lazyshim fetch` and for containers that must start
    complete.  Raises LazyshimError naming the first file that could not be filled (files
    that failed stay without data: an open or a later fill retries them)."""
    from .lazyroot import LazyRoot

    if isinstance(image_or_layers, ImageRecord):
        label, layers = image_or_layers.name, image_or_layers.layers
        sources = image_sources(store, image_or_layers)
    else:
        label, layers, sources = "image", list(image_or_layers), []
    root = LazyRoot(store, layers, sources)
    plan = root.prefetch_plan(everything=True)
    total = sum(1 for f, indices, _ in plan for i in indices if not f.is_filled(i))
    t0 = time.monotonic()
    errors: list[str] = []

    shown = threading.Lock()  # the prefetch's parallel requests report from their own threads

    def report() -> None:
        if progress is not None:
            with shown:
                st = root.stats()
                progress(st["files_filled"], total, st["bytes_fetched"])

    for filler, indices, _ in plan:
        filler.prefetch(indices, report, max_request=4 << 20, parallel=4)
        errors += filler.errors
    if errors or not root.complete():
        report()
        first = errors[0] if errors else "files remain unfilled"
        raise LazyshimError(f"{label}: {len(errors)} files could not be fetched; first: {first}")
    st = root.stats()
    if progress is not None:  # all done, those whose content another file brought in too
        progress(total, total, st["bytes_fetched"])
    return FillResult(st["files_filled"], st["bytes_fetched"], time.monotonic() - t0)


def resolve_user(store: Store, image: ImageRecord, rootfs: Path, user: str,
                 filled: bool = False) -> tuple[int, int]:
    """uid/gid for an image `User` string; names are looked up in the image's own files.
    `filled`: /etc/passwd and /etc/group are in place already (a complete image, or one
    whose supervisor prefilled them before it reported ready): they are only read."""
    if not user:
        return 0, 0
    lookup = functools.partial(_lookup, filled=filled)
    name, _, group = user.partition(":")
    uid = int(name) if name.isdigit() else None
    gid = int(group) if group.isdigit() else None
    if uid is not None and (gid is not None or not group):
        if gid is None:
            gid = lookup(store, image, rootfs, "/etc/passwd", uid=uid, field=3)
        return uid, gid if gid is not None else 0
    if uid is None:
        uid = lookup(store, image, rootfs, "/etc/passwd", name=name, field=2)
        if uid is None:
            raise LazyshimError(f"user {name!r} not found in the image's /etc/passwd")
    if gid is None:
        if group:
            gid = lookup(store, image, rootfs, "/etc/group", name=group, field=2)
            if gid is None:
                raise LazyshimError(f"group {group!r} not found in the image's /etc/group")
        else:
            gid = lookup(store, image, rootfs, "/etc/passwd", name=name, field=3) or 0
    return uid, gid


def _lookup(store: Store, image: ImageRecord, rootfs: Path, path: str, *, field: int,
            name: str | None = None, uid: int | None = None, filled: bool = False) -> int | None:
    from seccomp.resolve import RESOLVE_IN_ROOT, openat2

    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not filled:
            from .lazyroot import LazyRoot

            LazyRoot(store, image.layers, image_sources(store, image)).fill_path(root_fd, path)
        try:
            fd = openat2(root_fd, path.encode(), os.O_RDONLY, RESOLVE_IN_ROOT)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            text = f.read(1 << 20).decode("utf-8", "replace")
    finally:
        os.close(root_fd)
    for line in text.splitlines():
        parts = line.split(":")
        if len(parts) <= field:
            continue
        if (name is not None and parts[0] == name) or (uid is not None and parts[2] == str(uid)):
            return int(parts[field]) if parts[field].isdigit() else None
    return None


def ensure_lazy_layer(store: Store, image_ref: str, layer_digest: str,
                      manifest_digest: str | None = None) -> Path | None:
    """The lazy tree (an overlay lower dir) of one layer of `image_ref`, built now if needed;
    None when the layer has no verifiable index (containerd must unpack it itself).

    For callers that know a layer only by name (a containerd snapshotter sees the image
    reference and the layer digest as labels): the layer's descriptor, and so its TOC
    digest, comes from the registry's digest-checked manifest (pinned to `manifest_digest`
    when given), never from the caller's hints.  Raises LazyshimError when the registry
    cannot be reached or the layer is not in that manifest."""
    from .pull import ensure_layer, layer_format
    from .registry.reference import parse_reference
    from .sources import new_client
    from .store.layout import digest_dirname

    digest_dirname(layer_digest)  # a digest, not a path
    ref = parse_reference(image_ref)
    if _layer_built(store, layer_digest):
        return layer_lowerdir(store, layer_digest)
    store.ensure()
    with new_client(ref.registry) as client:
        manifest = client.get_manifest(ref.repository, manifest_digest or ref.digest or ref.tag or "latest")
        desc = next((d for d in manifest.layers if d.digest == layer_digest), None)
        if desc is None:
            raise LazyshimError(f"{image_ref}: manifest {manifest.digest[:19]} has no layer {layer_digest[:19]}")
        if layer_format(desc) == "legacy":
            return None
        with store.lock("gc", shared=True):
            ensure_layer(store, client, ref, desc)
    return layer_lowerdir(store, layer_digest)


def layer_lowerdir(store: Store, layer_digest: str) -> Path:
    """One directory that is a built layer's whole tree (an overlay lower dir of its own; in
    store layout v2 a read-only overlay of its metadata over the data objects, mounted now if
    it is not); LazyshimError if the layer is not built."""
    from .store.layouts import layout_of

    if not _layer_built(store, layer_digest):
        raise LazyshimError(f"layer {layer_digest[:19]} is not in the store {store.root}")
    return layout_of(store).layer_view(layer_digest)


def _layer_built(store: Store, layer_digest: str) -> bool:
    """A layer is built once its metadata is in place (it is renamed in last)."""
    from .store.layouts import has_meta

    return has_meta(store.layer_dir(layer_digest))


def layers_complete_in(store: Store, layer_digests: list[str]) -> bool:
    """Every file of these layers is filled (reads of their trees need no supervisor).  Reads
    the layers' marks only: a run that needs no supervisor imports no fill machinery."""
    from .store.marks import is_complete

    return all(is_complete(store.layer_dir(d)) for d in layer_digests)


def fill_files_in_layers(store: Store, layer_digests: list[str], paths: list[str]) -> int:
    """Fill the files at `paths` in each of these layers that holds one (each layer's tree on
    its own, symlinks kept inside it); returns how many were filled now.  For readers no
    supervisor watches that need a few known files of a lazy rootfs: containerd reads the
    /etc/passwd and /etc/group of a container snapshot to resolve the container's user."""
    from .lazyroot import LazyRoot

    root = LazyRoot(store, layer_digests)
    filled = 0
    for digest in layer_digests:
        fd = os.open(layer_lowerdir(store, digest), os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            filled += sum(root.fill_path(fd, path) for path in paths)
        finally:
            os.close(fd)
    root.flush()  # marked for the store's other processes (a supervisor, the next call) now
    return filled


def sweep_store(store: Store) -> list[str]:
    """Remove what builders killed mid-way left in the store (staging dirs and temporary files
    whose pid is gone); one line per thing removed.  For a long-lived owner of a store of its
    own (containerd's snapshotter, `--store`): the sweep before every `lazyshim` command reaches
    only the LAZYSHIM_ROOT store."""
    from .store.sweep import sweep_temporaries

    return sweep_temporaries(store)


def release_unused_layers(store: Store, keep: set[str]) -> list[str]:
    """Delete every layer of the store that is not in `keep` (digests), not listed by an image
    record and not a lower dir of a mounted overlay; returns the digests deleted.  For owners
    outside the image records (a containerd snapshotter) that need layers only while their own
    snapshots do: a layer left by a crash between building and recording it goes too."""
    from .store.gc import collect, collect_data

    removed = [name.replace("-", ":", 1) for name in collect(store, keep)]
    collect_data(store)
    return removed
