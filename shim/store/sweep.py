"""Sweep what a killed lazyshim left in the store: staging dirs and temporary files.

Everything the store builds is made under a temporary name that carries the builder's pid
(`tmp/<layer>.<pid>` for a pull's staging tree, `tmp/gc-<layer>.<pid>` for a layer being
deleted, `.<name>.<pid>.tmp` for an atomic write, `tmp/probe.<pid>` for the layout probe) and
renamed into place (or removed) when complete.  A temporary whose pid is no longer running will
never be renamed: it is garbage.

A dead process may have left mounts inside its temporary dir (the layout probe mounts a tmpfs
and an overlay in its own): they are detached before the dir is deleted, and a dir with a mount
below it that cannot be detached is kept.  `shutil.rmtree` walks into mount points, and through
a bind mount it would delete files that are not the store's.

`TEMPORARIES` is the one list of where such names live and what they look like; a part of
the store that makes temporaries of its own adds its entry here.  A name whose pid is
alive is kept, even if that pid was reused by another process: sweeping is conservative.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import LazyshimError
from .layout import Store


@dataclass(frozen=True)
class Temporaries:
    """Names matching `pattern` (a `pid` group) in the directory `where(store)`."""
    where: Callable[[Store], Path]
    pattern: re.Pattern[str]
    what: str


TEMPORARIES: list[Temporaries] = [
    Temporaries(lambda s: s.tmp, re.compile(r"(?:gc-)?[a-z0-9]+-[0-9a-f]+\.(?P<pid>[0-9]+)"), "staging dir"),
    Temporaries(lambda s: s.images, re.compile(r"\..+\.(?P<pid>[0-9]+)\.tmp"), "temporary file"),
    Temporaries(lambda s: s.root, re.compile(r"\..+\.(?P<pid>[0-9]+)\.tmp"), "temporary file"),
    # v2 data objects being written (shim/store/objects.py): verified and renamed, or garbage.
    Temporaries(lambda s: s.tmp, re.compile(r"\.object\.(?P<pid>[0-9]+)\.[0-9]+"), "temporary data object"),
    # the layout probe's scratch dir (shim/store/probe.py), with its mounts if it was killed
    Temporaries(lambda s: s.tmp, re.compile(r"probe\.(?P<pid>[0-9]+)"), "layout probe dir"),
]


def pid_alive(pid: int) -> bool:
    """A running process (a zombie has finished: its temporaries are garbage too)."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b") ", 1)[1][:1] != b"Z"
    except (OSError, IndexError):
        return False


def sweep_temporaries(store: Store) -> list[str]:
    """Remove temporaries whose maker is gone; returns one line per thing removed."""
    removed: list[str] = []
    for kind in TEMPORARIES:
        top = kind.where(store)
        try:
            names = os.listdir(top)
        except OSError:
            continue
        for name in names:
            m = kind.pattern.fullmatch(name)
            if m is None or pid_alive(int(m.group("pid"))):
                continue
            path = top / name
            if path.is_dir() and not path.is_symlink():
                remove_tree(path)
            else:
                path.unlink(missing_ok=True)
            if not os.path.lexists(path):
                removed.append(f"{kind.what} {path}")
    return removed


def remove_tree(path: Path) -> bool:
    """Delete a dead maker's directory, detaching what is mounted at or below it first; never
    deletes through a mount: if one cannot be detached the dir is kept.  True if it is gone."""
    from .sysmount import detach, mounts_below

    try:
        for mp in mounts_below(path):  # deepest first
            detach(Path(mp))
    except LazyshimError:
        return False
    if mounts_below(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return not os.path.lexists(path)


def release_unused_mounts(store: Store) -> list[str]:
    """Detach the store's own mounts (v2's metadata tmpfs and the read-only views on it) once no
    layer is left to need them; while any layer exists they stay, since a container's overlay,
    podman's `diff` links and the next run all use them.  Under the `gc` lock held exclusively:
    a pull builds its trees on the tmpfs holding it shared, before its layer appears."""
    from .layouts import release, view_root

    root = view_root(store)
    if not os.path.ismount(root):
        return []
    with store.lock("gc"):
        if any(store.layers.iterdir()) or not os.path.ismount(root):
            return []
        try:
            release(store)
        except LazyshimError:
            return []
    return [f"metadata tmpfs {root} (no layer left)"]
