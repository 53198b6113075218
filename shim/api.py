"""What the runtime asks of the lazy image layer, in the runtime's own terms.

The runtime knows images as records with layer digests and trees on disk; it never sees
a wire format.  Keep this the only door between the two.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import LazyshimError
from .store.layout import Store
from .store.metadata import ImageRecord


def open_store(root: Path | None = None) -> Store:
    store = Store(root)
    store.ensure()
    return store


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
    return str(getattr(store, "layout_version", "v1 (placeholder trees)"))


def image_sources(store: Store, image: ImageRecord, asked: str | None = None) -> list[str]:
    """The references a container of `image` fills from (the supervisor's `--sources`);
    `asked`: the name the user gave, tried first."""
    from .sources import image_references

    return image_references(store, image, asked)


def layer_trees(store: Store, image: ImageRecord) -> list[Path]:
    """The image's placeholder trees, bottom layer first."""
    return [store.layer_dir(d) / "tree" for d in image.layers]


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
    that failed stay empty placeholders: an open or a later fill retries them)."""
    from .lazyroot import LazyRoot

    if isinstance(image_or_layers, ImageRecord):
        label, layers = image_or_layers.name, image_or_layers.layers
        sources = image_sources(store, image_or_layers)
    else:
        label, layers, sources = "image", list(image_or_layers), []
    root = LazyRoot(store, layers, sources)
    plan = root.prefetch_plan(everything=True)
    total = sum(1 for f, indices, _ in plan for i in indices if not f.filled[i])
    t0 = time.monotonic()
    errors: list[str] = []

    def report() -> None:
        if progress is not None:
            st = root.stats()
            progress(st["files_filled"], total, st["bytes_fetched"])

    for filler, indices, _ in plan:
        filler.prefetch(indices, report, max_request=8 << 20)
        errors += filler.errors
    report()
    if errors or not root.complete():
        first = errors[0] if errors else "files remain unfilled"
        raise LazyshimError(f"{label}: {len(errors)} files could not be fetched; first: {first}")
    st = root.stats()
    return FillResult(st["files_filled"], st["bytes_fetched"], time.monotonic() - t0)


def resolve_user(store: Store, image: ImageRecord, rootfs: Path, user: str) -> tuple[int, int]:
    """uid/gid for an image `User` string; names are looked up in the image's own files."""
    if not user:
        return 0, 0
    name, _, group = user.partition(":")
    uid = int(name) if name.isdigit() else None
    gid = int(group) if group.isdigit() else None
    if uid is not None and (gid is not None or not group):
        if gid is None:
            gid = _lookup(store, image, rootfs, "/etc/passwd", uid=uid, field=3)
        return uid, gid if gid is not None else 0
    if uid is None:
        uid = _lookup(store, image, rootfs, "/etc/passwd", name=name, field=2)
        if uid is None:
            raise LazyshimError(f"user {name!r} not found in the image's /etc/passwd")
    if gid is None:
        if group:
            gid = _lookup(store, image, rootfs, "/etc/group", name=group, field=2)
            if gid is None:
                raise LazyshimError(f"group {group!r} not found in the image's /etc/group")
        else:
            gid = _lookup(store, image, rootfs, "/etc/passwd", name=name, field=3) or 0
    return uid, gid


def _lookup(store: Store, image: ImageRecord, rootfs: Path, path: str, *, field: int,
            name: str | None = None, uid: int | None = None) -> int | None:
    from seccomp.resolve import RESOLVE_IN_ROOT, openat2

    from .lazyroot import LazyRoot

    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
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
        return store.layer_dir(layer_digest) / "tree"
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
    return store.layer_dir(layer_digest) / "tree"


def layer_lowerdir(store: Store, layer_digest: str) -> Path:
    """Where a built layer's tree is (an overlay lower dir); LazyshimError if it is not built."""
    if not _layer_built(store, layer_digest):
        raise LazyshimError(f"layer {layer_digest[:19]} is not in the store {store.root}")
    return store.layer_dir(layer_digest) / "tree"


def _layer_built(store: Store, layer_digest: str) -> bool:
    """A layer is built once its metadata is in place (it is renamed in last)."""
    return (store.layer_dir(layer_digest) / "meta.cbor").exists()


def layers_complete_in(store: Store, layer_digests: list[str]) -> bool:
    """Every file of these layers is filled (reads of their trees need no supervisor)."""
    from .lazyroot import layers_complete

    return layers_complete(store, layer_digests)


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
    return filled


def release_unused_layers(store: Store, keep: set[str]) -> list[str]:
    """Delete every layer of the store that is not in `keep` (digests), not listed by an image
    record and not a lower dir of a mounted overlay; returns the digests deleted.  For owners
    outside the image records (a containerd snapshotter) that need layers only while their own
    snapshots do: a layer left by a crash between building and recording it goes too."""
    import shutil

    from .store.gc import mounted_layers, referenced_layers
    from .store.layout import digest_dirname

    removed: list[str] = []
    if not store.layers.is_dir():
        return removed
    with store.lock("gc"):
        spared = referenced_layers(store) | mounted_layers(store) | {digest_dirname(d) for d in keep}
        for d in sorted(store.layers.iterdir()):
            if d.name in spared or not d.is_dir():
                continue
            with store.lock(d.name):
                trash = store.tmp / f"gc-{d.name}.{os.getpid()}"
                os.rename(d, trash)
                shutil.rmtree(trash, ignore_errors=True)
                alg, _, hexpart = d.name.partition("-")
                removed.append(f"{alg}:{hexpart}")
    return removed
