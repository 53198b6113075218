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


def ensure_image(store: Store, name: str, pull: bool = True) -> ImageRecord:
    from .store.refs import resolve_image

    try:
        return resolve_image(store, name)
    except LazyshimError:
        if not pull:
            raise
    from .pull import pull as do_pull

    return do_pull(name, store)


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
