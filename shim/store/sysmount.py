"""The few mount(2) calls the store makes itself: its metadata tmpfs and read-only views.

The store mounts only below its own root; everything it mounts it can find again from
/proc/self/mountinfo and detach (MNT_DETACH also takes the mounts stacked below it).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from ..errors import LazyshimError

_libc = ctypes.CDLL(None, use_errno=True)
MS_RDONLY = 1
MNT_DETACH = 2


def mount(source: str, target: Path, fstype: str, options: str, flags: int = 0) -> None:
    if _libc.mount(source.encode(), os.fsencode(target), fstype.encode(), flags, options.encode()) != 0:
        e = ctypes.get_errno()
        raise LazyshimError(f"mounting {fstype} on {target}: {os.strerror(e)}")


def try_mount(source: str, target: Path, fstype: str, options: str, flags: int = 0) -> int:
    """0, or the errno of a refused mount (probes expect refusals)."""
    if _libc.mount(source.encode(), os.fsencode(target), fstype.encode(), flags, options.encode()) != 0:
        return ctypes.get_errno() or 1
    return 0


def detach(target: Path) -> None:
    """Lazily unmount `target` and everything below it; nothing mounted there is fine."""
    if _libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        if e not in (22, 2):  # EINVAL: not a mount point; ENOENT: gone
            raise LazyshimError(f"unmounting {target}: {os.strerror(e)}")


def mounts_below(root: Path) -> list[str]:
    """Mount points at or below `root` in this mount namespace, deepest first."""
    prefix = os.path.realpath(root)
    out = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                parts = line.split(" ")
                if len(parts) > 4:
                    mp = parts[4].replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
                        .replace("\\134", "\\")
                    if mp == prefix or mp.startswith(prefix + "/"):
                        out.append(mp)
    except OSError:
        return []
    return sorted(set(out), key=len, reverse=True)
