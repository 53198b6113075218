"""Mount the container's rootfs: a per-container upper dir over the shared lazy trees."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

from shim.errors import LazyshimError

_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2


def mount_overlay(lowers: list[Path], upper: Path, work: Path, target: Path, userxattr: bool = False,
                  data_lowers: Sequence[Path] = (), options: Sequence[str] = ()) -> None:
    """lowers are bottom first, as image layers are listed; overlayfs wants top first.

    `data_lowers` are data-only lower layers (after `::`, reachable only through redirects of
    metacopy files) and `options` what such a stack needs (`metacopy=on`, ...): both as the
    image layer hands them over (`shim.api.layer_mount`)."""
    opts = "lowerdir=" + ":".join(str(p) for p in reversed(lowers))
    for d in data_lowers:
        opts += f"::{d}"
    opts += f",upperdir={upper},workdir={work}"
    if userxattr:
        opts += ",userxattr"
    for o in options:
        opts += f",{o}"
    if len(opts) >= 4096:
        raise LazyshimError(f"too many layers for one overlay mount ({len(lowers)})")
    if _libc.mount(b"overlay", str(target).encode(), b"overlay", 0, opts.encode()) != 0:
        e = ctypes.get_errno()
        raise LazyshimError(f"mounting overlay on {target}: {os.strerror(e)}")


def unmount(target: Path) -> None:
    if _libc.umount2(str(target).encode(), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        if e not in (22, 2):  # EINVAL: not mounted; ENOENT: gone
            raise LazyshimError(f"unmounting {target}: {os.strerror(e)}")
