"""What the runtime asks of the lazy image layer, in the runtime's own terms.

The runtime knows images as records with layer digests and trees on disk; it never sees
a wire format.  Keep this the only door between the two.
"""

from __future__ import annotations

import os
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


def ensure_image(store: Store, name: str, pull: bool = True) -> ImageRecord:
    from .store.refs import resolve_image

    try:
        return resolve_image(store, name)
    except LazyshimError:
        if not pull:
            raise
    from .pull import pull as do_pull

    return do_pull(name, store)


def layer_mount(store: Store, image: ImageRecord) -> MountSpec:
    """What an overlay of the image needs (lower dirs bottom first, data-only lower dirs, mount
    options), whatever the store's layout; trees lost with a reboot are rebuilt first."""
    from .store.layouts import layout_of

    return layout_of(store).mount_spec(image.layers)


def layer_trees(store: Store, image: ImageRecord) -> list[Path]:
    """The image's layer trees (overlay lower dirs), bottom layer first."""
    return layer_mount(store, image).lowers


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
        LazyRoot(store, image.layers).fill_path(root_fd, path)
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
