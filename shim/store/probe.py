"""Can this process serve the v2 store layout here?  Ask the kernel, never its version.

v2 needs overlayfs data-only lower layers (`lowerdir=META::DATA`) with `metacopy=on` and
`redirect_dir=on`, which read `trusted.overlay.*` xattrs: host root only.  The probe mounts a
tiny instance of exactly that shape in the store's tmp dir and checks the two behaviours the
layout rests on: a file whose data object is absent fails to open (an error, never zeros),
and one whose object exists reads the object's bytes.

The probe works in `tmp/probe.<pid>` and detaches its mounts when done; if it is killed
half-way, the store's sweep (`shim.store.sweep`) detaches and deletes what it left.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LazyshimError
from .sweep import remove_tree
from .sysmount import MS_RDONLY, detach, try_mount

_PROBE_BYTES = b"lazyshim-probe\n"


def data_only_lowers_work(tmp: Path) -> bool:
    from ..userns import host_root

    if not host_root():
        return False
    base = tmp / f"probe.{os.getpid()}"
    if not remove_tree(base):  # a dead process's, whose pid this one reuses
        raise LazyshimError(f"cannot clear {base}: a mount below it cannot be detached")
    meta, data, view = base / "meta", base / "data", base / "view"
    for d in (meta, data / "o", view):
        d.mkdir(parents=True)
    mounted: list[Path] = []
    try:
        if try_mount("tmpfs", meta, "tmpfs", "mode=0700,size=1m"):
            return False
        mounted.append(meta)
        for name, obj in (("present", "/o/present"), ("absent", "/o/absent")):
            fd = os.open(meta / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                os.ftruncate(fd, len(_PROBE_BYTES))
                os.setxattr(fd, "trusted.overlay.metacopy", b"")
                os.setxattr(fd, "trusted.overlay.redirect", obj.encode())
            finally:
                os.close(fd)
        (data / "o" / "present").write_bytes(_PROBE_BYTES)
        if try_mount("overlay", view, "overlay", f"lowerdir={meta}::{data},metacopy=on,redirect_dir=on",
                     MS_RDONLY):
            return False
        mounted.append(view)
        try:
            (view / "absent").read_bytes()
            return False  # served something for a file with no data: unusable
        except OSError:
            pass
        try:
            return (view / "present").read_bytes() == _PROBE_BYTES
        except OSError:
            return False
    except OSError:
        return False
    finally:
        for m in reversed(mounted):
            detach(m)
        remove_tree(base)
