"""Compare two directory trees the way an image's rootfs must match: names, types, content,
modes, owners, symlink targets, hardlink groups (same inode), xattrs and mtimes.

`snapshot(root)` describes a tree as a dict path -> attributes (plus the hardlink groups),
so a test can diff two trees and print only what differs.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

#: xattrs that say how a tree is stored, not what the image holds.
IGNORED_XATTR_PREFIXES = ("trusted.overlay.", "user.overlay.", "security.selinux")


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for n in names:
        if n.startswith(IGNORED_XATTR_PREFIXES):
            continue
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            continue
    return out


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def snapshot(root: Path, *, mtimes: bool = True, exclude: frozenset[str] = frozenset(),
             contents: bool = True) -> dict[str, tuple]:
    """path -> (kind, mode, uid, gid, size/target/digest, mtime, xattrs); `#links` -> groups.

    The root directory itself is left out (its attributes belong to the bundle, not the image).
    """
    out: dict[str, tuple] = {}
    by_inode: dict[tuple[int, int], list[str]] = {}
    root_s = str(root)
    for dirpath, dirnames, filenames in os.walk(root_s):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root_s)
            if rel in exclude:
                if name in dirnames:
                    dirnames.remove(name)
                continue
            st = os.lstat(full)
            kind = stat.S_IFMT(st.st_mode)
            if stat.S_ISREG(kind):
                detail: object = (st.st_size, _digest(full) if contents else None)
                by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(kind):
                detail = os.readlink(full)
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                detail = (os.major(st.st_rdev), os.minor(st.st_rdev))
            else:
                detail = None
            mtime = int(st.st_mtime) if mtimes and not stat.S_ISLNK(kind) else None
            out[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, detail, mtime,
                        tuple(sorted(_xattrs(full).items())))
    out["#links"] = tuple(sorted(tuple(sorted(g)) for g in by_inode.values() if len(g) > 1))
    return out


def diff(a: dict[str, tuple], b: dict[str, tuple], limit: int = 20) -> list[str]:
    """Human-readable differences between two snapshots (empty when they are equal)."""
    fields = ("type", "mode", "uid", "gid", "content", "mtime", "xattrs")
    out: list[str] = []
    for k in sorted(set(a) | set(b)):
        if k not in a:
            out.append(f"only in second: {k}")
        elif k not in b:
            out.append(f"only in first: {k}")
        elif a[k] != b[k]:
            if k == "#links":
                out.append(f"hardlink groups differ: {a[k]} vs {b[k]}")
                continue
            what = [f"{f} {x!r} != {y!r}" for f, x, y in zip(fields, a[k], b[k], strict=True) if x != y]
            out.append(f"{k}: " + "; ".join(what))
        if len(out) >= limit:
            out.append("...")
            break
    return out
