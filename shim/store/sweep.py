"""Sweep what a killed lazyshim left in the store: staging dirs and temporary files.

Everything the store builds is made under a temporary name that carries the builder's pid
(`tmp/<layer>.<pid>` for a pull's staging tree, `tmp/gc-<layer>.<pid>` for a layer being
deleted, `.<name>.<pid>.tmp` for an atomic write) and renamed into place when complete.  A
temporary whose pid is no longer running will never be renamed: it is garbage.

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
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            if not os.path.lexists(path):
                removed.append(f"{kind.what} {path}")
    return removed
