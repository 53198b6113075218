"""Materialise a layer's TOC as a placeholder tree in overlayfs lower-dir form.

Regular files become sparse files of the right size (no data blocks); everything else
(dirs, symlinks, hardlinks, devices, fifos, xattrs, owners, modes, mtimes) is exact, so
the container sees the final tree from the first instant and only file content arrives
later.  OCI whiteouts (`.wh.NAME`, `.wh..wh..opq`) are written the way overlayfs reads
them: a 0/0 character device, and an `overlay.opaque` xattr on the directory.

The tree is ours alone while it is built (a fresh staging dir), so we track what we made
in memory and never follow a symlink: an entry below a symlink or a non-directory is an
error, not a write outside the tree.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from ..errors import LazyshimError
from ..formats.toc import OVERLAY_XATTR_PREFIXES, Entry, Toc

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"


class TreeOptions:
    """How much of the image's identity this process may reproduce.

    Host root: everything, and overlay reads `trusted.overlay.*`.  Root of a user namespace
    (rootless with a subuid range): owners within the mapping, whiteouts, but overlay is
    mounted with `userxattr` and reads `user.overlay.*`.  A plain user: no owners at all."""

    def __init__(self, privileged: bool | None = None) -> None:
        from ..userns import host_root

        self.privileged = host_root() if privileged is None else privileged
        self.can_chown = self.privileged or os.geteuid() == 0
        self.overlay_xattr_prefix = "trusted.overlay." if self.privileged else "user.overlay."
        self.skipped: list[str] = []  # device nodes under /dev a rootless store could not make


class TreeBuilder:
    """Adds entries one by one to a new tree (a TOC, or a tar stream being unpacked)."""

    def __init__(self, dest: Path, opts: TreeOptions | None = None) -> None:
        self.opts = opts or TreeOptions()
        self.root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._kinds: dict[str, str] = {"": "dir"}
        self._dir_times: list[tuple[str, Entry | None]] = []

    def add(self, e: Entry, own_xattrs: dict[str, bytes] | None = None) -> int:
        """Create one entry; returns its placeholder inode (0 unless a regular file).

        `own_xattrs` are the store's own (overlay's metacopy and redirect), set on a regular
        file after the image's; the image's never include overlay's."""
        try:
            return _make(self.root_fd, e, self._kinds, self.opts, self._dir_times, own_xattrs)
        except OSError as err:
            raise LazyshimError(f"cannot materialise {e.type} {e.name!r}: {err.strerror}") from err

    def open_file(self, e: Entry) -> int:
        """An O_WRONLY fd of a regular file just added (for unpacking full layers)."""
        return os.open(e.name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.root_fd)

    def finish(self) -> None:
        """Restore directory mtimes (creating children moved them), deepest first."""
        try:
            for name, e in reversed(self._dir_times):
                if e is not None:
                    os.utime(name or ".", (e.mtime, e.mtime), dir_fd=self.root_fd, follow_symlinks=False)
        finally:
            self.close()

    def close(self) -> None:
        if self.root_fd >= 0:
            os.close(self.root_fd)
            self.root_fd = -1


def build_tree(toc: Toc, dest: Path, opts: TreeOptions | None = None,
               own_xattrs: Callable[[int, Entry], dict[str, bytes] | None] | None = None) -> list[int]:
    """Create the placeholder tree for `toc` under the empty dir `dest`.

    Returns, per entry, the inode of its placeholder (0 for non-regular entries), which
    is how the supervisor recognises the files it must fill.  `own_xattrs(index, entry)`
    gives the store's xattrs for a regular file (a metadata tree's metacopy and redirect).
    """
    b = TreeBuilder(dest, opts)
    owner: dict[str, int] = {}  # name -> index of the regular file that made it last
    linked: set[int] = set()  # regular files some hardlink entry points at
    names: list[str | None] = []  # per entry, a regular file's name (the strings `owner` holds)
    try:
        inodes = []
        for i, e in enumerate(toc.entries):
            inodes.append(b.add(e, own_xattrs(i, e) if own_xattrs is not None and e.type == "reg" else None))
            if e.type == "reg":
                owner[e.name] = i
                names.append(e.name)
            else:
                names.append(None)
                if e.type == "hardlink" and e.link in owner:
                    linked.add(owner[e.link])
    except BaseException:
        b.close()
        raise
    # A file a later entry replaced (tar: the last one wins) or removed with its directory
    # has no placeholder any more; forget its inode, which the file system may reuse.
    # Still reachable through a hardlink, its inode lives on and stays ours to fill.
    for i, ino in enumerate(inodes):
        if ino and i not in linked:
            name = names[i]
            if owner.get(name) != i or b._kinds.get(name) != "reg":
                inodes[i] = 0
    b.finish()
    return inodes


def _parent(root_fd: int, name: str, kinds: dict[str, str], opts: TreeOptions, dir_times: list) -> str:
    parent, _, base = name.rpartition("/")
    if not base:
        raise LazyshimError(f"invalid entry name {name!r}")
    # Create missing parents (tar streams may omit them) and refuse any non-dir parent.
    path = ""
    for part in parent.split("/") if parent else ():
        path = f"{path}/{part}" if path else part
        kind = kinds.get(path)
        if kind is None:
            os.mkdir(path, 0o755, dir_fd=root_fd)
            kinds[path] = "dir"
            dir_times.append((path, None))
        elif kind != "dir":
            raise LazyshimError(f"entry {name!r} lies below {kind} {path!r}")
    return parent


def _make(root_fd: int, e: Entry, kinds: dict[str, str], opts: TreeOptions, dir_times: list,
          own_xattrs: dict[str, bytes] | None = None) -> int:
    name = e.name
    if name == "":  # the layer root itself
        if e.type == "dir":
            os.fchmod(root_fd, e.mode)
            _own(root_fd, None, e, opts)
            dir_times.append(("", e))
        return 0
    parent = _parent(root_fd, name, kinds, opts, dir_times)
    base = name.rpartition("/")[2]

    if base == OPAQUE_MARKER:
        _set_xattr(root_fd, parent or ".", opts.overlay_xattr_prefix + "opaque", b"y")
        return 0
    if base.startswith(WHITEOUT_PREFIX):
        target = (parent + "/" if parent else "") + base[len(WHITEOUT_PREFIX):]
        if not base[len(WHITEOUT_PREFIX):]:
            raise LazyshimError(f"invalid whiteout {name!r}")
        _remove(root_fd, target, kinds)
        _mknod(root_fd, target, stat.S_IFCHR, 0, 0, opts)
        kinds[target] = "whiteout"
        return 0

    existing = kinds.get(name)
    if existing is not None:
        if existing == "dir" and e.type == "dir":
            _apply_meta(root_fd, name, e, opts)
            dir_times.append((name, e))
            return 0
        _remove(root_fd, name, kinds)

    ino = 0
    if e.type == "dir":
        os.mkdir(name, 0o700, dir_fd=root_fd)
        dir_times.append((name, e))
    elif e.type == "reg":
        kinds[name] = "reg"
        return _make_placeholder(root_fd, name, e, opts, own_xattrs)
    elif e.type == "symlink":
        os.symlink(e.link, name, dir_fd=root_fd)
    elif e.type == "hardlink":
        if kinds.get(e.link) != "reg":
            raise LazyshimError(f"hardlink {name!r} -> {e.link!r}: target is not a file of this layer")
        os.link(e.link, name, src_dir_fd=root_fd, dst_dir_fd=root_fd, follow_symlinks=False)
        kinds[name] = "reg"
        return 0  # shares the target's inode: filling the target fills it
    elif e.type in ("char", "block"):
        if not _mknod(root_fd, name, stat.S_IFCHR if e.type == "char" else stat.S_IFBLK, e.dev_major, e.dev_minor,
                      opts):
            return 0
    elif e.type == "fifo":
        os.mkfifo(name, 0o600, dir_fd=root_fd)
    kinds[name] = e.type if e.type != "hardlink" else "reg"
    _apply_meta(root_fd, name, e, opts)
    return ino


def _make_placeholder(root_fd: int, name: str, e: Entry, opts: TreeOptions,
                      own_xattrs: dict[str, bytes] | None = None) -> int:
    """A sparse regular file with the entry's metadata, set through one fd (the hot loop of
    a pull: tens of thousands of files, so no path lookups and no needless syscalls)."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, e.mode & 0o777,
                 dir_fd=root_fd)
    try:
        if e.size:
            os.ftruncate(fd, e.size)  # sparse: no data blocks until filled
        for k, v in e.xattrs.items():
            if not k.startswith(OVERLAY_XATTR_PREFIXES):
                os.setxattr(fd, k, v)
        if own_xattrs:
            for k, v in own_xattrs.items():
                os.setxattr(fd, k, v)
        st = os.fstat(fd)
        if opts.can_chown and (st.st_uid, st.st_gid) != (e.uid, e.gid):
            os.fchown(fd, e.uid, e.gid)
            st = None  # chown may have cleared setuid/setgid
        if st is None or st.st_mode & 0o7777 != e.mode:  # umask, setuid bits
            os.fchmod(fd, e.mode)
        os.utime(fd, (e.mtime, e.mtime))
        return os.fstat(fd).st_ino if st is None else st.st_ino
    finally:
        os.close(fd)


def _apply_meta(root_fd: int, name: str, e: Entry, opts: TreeOptions) -> None:
    for k, v in e.xattrs.items():
        if not k.startswith(OVERLAY_XATTR_PREFIXES):  # only the store steers overlayfs
            _set_xattr(root_fd, name, k, v)
    _own(root_fd, name, e, opts)
    if e.type != "symlink":
        os.chmod(name, e.mode, dir_fd=root_fd, follow_symlinks=True)  # after chown: chown clears setuid
    os.utime(name, (e.mtime, e.mtime), dir_fd=root_fd, follow_symlinks=False)


def _own(root_fd: int, name: str | None, e: Entry, opts: TreeOptions) -> None:
    if not opts.can_chown:
        return  # a plain user: the store keeps the caller's ids
    if name is None:
        os.fchown(root_fd, e.uid, e.gid)
    else:
        os.chown(name, e.uid, e.gid, dir_fd=root_fd, follow_symlinks=False)


def _set_xattr(root_fd: int, name: str, key: str, value: bytes) -> None:
    if not _is_dir_or_reg(root_fd, name):
        if key.startswith("user."):
            return  # user xattrs are not allowed on symlinks and special files
        os.setxattr(f"/proc/self/fd/{root_fd}/{name}", key, value, follow_symlinks=False)
        return
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root_fd)
    try:
        os.setxattr(fd, key, value)
    finally:
        os.close(fd)


def _is_dir_or_reg(root_fd: int, name: str) -> bool:
    st = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
    return stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)


def _mknod(root_fd: int, name: str, kind: int, major: int, minor: int, opts: TreeOptions) -> bool:
    """Create a device node; False if it was skipped.

    Without privilege only /dev entries may be skipped (as rootless podman does): the
    runtime mounts a fresh /dev over them, so the container could never see them.  They are
    listed in `opts.skipped` for the caller to report; any other device node fails the pull."""
    try:
        os.mknod(name, kind | 0o600, os.makedev(major, minor), dir_fd=root_fd)
        return True
    except PermissionError as e:
        if name.startswith("dev/") and (major, minor) != (0, 0):
            opts.skipped.append(name)
            return False
        raise LazyshimError(
            f"cannot create device node {name!r} without privilege (rootless stores cannot hold it)"
        ) from e


def _remove(root_fd: int, name: str, kinds: dict[str, str]) -> None:
    """Remove what a later entry replaces (tar semantics: the last entry wins)."""
    kind = kinds.pop(name, None)
    if kind is None:
        return
    if kind == "dir":
        prefix = name + "/"
        for child in sorted((k for k in kinds if k.startswith(prefix)), reverse=True):
            _remove(root_fd, child, kinds)
        os.rmdir(name, dir_fd=root_fd)
    else:
        try:
            os.unlink(name, dir_fd=root_fd)
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise
