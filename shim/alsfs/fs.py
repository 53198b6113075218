"""The FUSE file system containers/storage looks layers up in (mfusepy, libfuse 3).

Only names and small files go through it: `diff` is a symlink to the layer's tree in the
store (overlayfs follows it when podman mounts a container, so the container's reads never
pass through FUSE), `info` is a few hundred bytes of JSON, and `blob` is read only by podman's
save/push/build.  Lookups of `diff`, `info` or `blob` pull the layer lazily (footer and TOC);
opening `blob` downloads the whole blob into the store, verified, before the first byte.

containers/storage tells the store when it uses a layer by creating `<layer>/use` and when it
stops by removing `<layer>` (both answered ENOENT, as it expects): the count keeps the layer
from `lazyshim gc`.

Errors: a name that is no valid reference or digest, and a layer we do not make lazy, are
ENOENT (podman then downloads the layer itself); a registry or store failure is EIO and one
line on stderr, never a traceback.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
import time

import mfusepy

from ..errors import LazyshimError
from ..formats.toc import FormatError
from ..registry.errors import RegistryError
from . import names
from .layers import Entry, NotServed, StoreLayers

# What a registry, an image or the store can make go wrong on a lookup: EIO and one line.
EXPECTED = (LazyshimError, RegistryError, FormatError, ValueError, OSError)


def log(msg: str) -> None:
    print(f"lazyshim: layer-store: {msg}", file=sys.stderr, flush=True)


class LayerStoreFS(mfusepy.Operations):
    use_ns = True

    def __init__(self, layers: StoreLayers, banner: str = "") -> None:
        self.layers = layers
        self.banner = banner
        self._now = time.time_ns()
        self._fds: dict[int, int] = {}
        self._fh = 0
        self._lock = threading.Lock()
        self.served = False

    def init(self, path: str) -> None:
        self.served = True  # mounted: a non-zero return of the loop now means it was stopped
        if self.banner:
            print(self.banner, file=sys.stderr, flush=True)  # once mounted: "ready"

    # ---- names -------------------------------------------------------------------------
    def _name(self, path: str) -> names.Name:
        name = names.parse(path)
        if name is None:
            raise mfusepy.FuseOSError(errno.ENOENT)
        return name

    def _entry(self, name: names.Name) -> Entry:
        try:
            return self.layers.entry(name.ref, name.digest)
        except NotServed:
            raise mfusepy.FuseOSError(errno.ENOENT) from None
        except EXPECTED as e:
            log(f"{name.ref} {name.digest[:19]}: {e}")
            raise mfusepy.FuseOSError(errno.EIO) from None

    def _attrs(self, mode: int, size: int = 0, nlink: int = 1) -> dict:
        t = self._now
        return {"st_mode": mode, "st_size": size, "st_nlink": nlink, "st_uid": 0, "st_gid": 0,
                "st_atime": t, "st_mtime": t, "st_ctime": t}

    def _diff(self, name: names.Name) -> str:
        self._entry(name)
        try:
            return str(self.layers.diff(name.digest))
        except EXPECTED as e:
            log(f"{name.ref} {name.digest[:19]}: diff: {e}")
            raise mfusepy.FuseOSError(errno.EIO) from None

    # ---- what podman calls -----------------------------------------------------------------
    def getattr(self, path: str, fh: int | None = None) -> dict:
        name = self._name(path)
        if not name.file:
            return self._attrs(stat.S_IFDIR | 0o755, nlink=2)
        if name.file == names.USE_FILE:
            raise mfusepy.FuseOSError(errno.ENOENT)
        if name.file == "diff":
            return self._attrs(stat.S_IFLNK | 0o777, len(self._diff(name).encode()))
        entry = self._entry(name)
        size = len(entry.info) if name.file == "info" else entry.blob_size
        return self._attrs(stat.S_IFREG | 0o444, size)

    def readlink(self, path: str) -> str:
        name = self._name(path)
        if name.file != "diff":
            raise mfusepy.FuseOSError(errno.EINVAL)
        return self._diff(name)

    def readdir(self, path: str, fh: int) -> list[str]:
        name = self._name(path)
        if name.file:
            raise mfusepy.FuseOSError(errno.ENOTDIR)
        return [".", "..", *(names.LAYER_FILES if name.digest else ())]

    def open(self, path: str, flags: int) -> int:
        name = self._name(path)
        if flags & (os.O_WRONLY | os.O_RDWR) or name.file not in ("info", "blob"):
            raise mfusepy.FuseOSError(errno.EACCES if name.file in ("info", "blob") else errno.ENOENT)
        entry = self._entry(name)
        fd = -1
        if name.file == "blob":
            try:
                fd = self.layers.open_blob(entry)
            except EXPECTED as e:
                log(f"{name.ref} {name.digest[:19]}: blob: {e}")
                raise mfusepy.FuseOSError(errno.EIO) from None
        with self._lock:
            self._fh += 1
            self._fds[self._fh] = fd
            return self._fh

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        fd = self._fds.get(fh)
        if fd is None:
            raise mfusepy.FuseOSError(errno.EBADF)
        if fd < 0:
            entry = self._entry(self._name(path))
            return entry.info[offset:offset + size]
        return os.pread(fd, size, offset)

    def release(self, path: str, fh: int) -> int:
        with self._lock:
            fd = self._fds.pop(fh, None)
        if fd is not None and fd >= 0:
            os.close(fd)
        return 0

    def create(self, path: str, mode: int, flags: int = 0) -> int:
        """containers/storage creates `use` to say it uses the layer; it wants ENOENT."""
        name = self._name(path)
        if name.file == names.USE_FILE:
            try:
                self.layers.use(name.digest)
            except EXPECTED as e:
                log(f"{name.ref} {name.digest[:19]}: counting a use: {e}")
        raise mfusepy.FuseOSError(errno.ENOENT)

    def rmdir(self, path: str) -> int:
        """containers/storage removes a layer's dir to say it no longer uses it; ENOENT."""
        name = self._name(path)
        if name.digest and not name.file:
            try:
                self.layers.release(name.digest)
            except EXPECTED as e:
                log(f"{name.ref} {name.digest[:19]}: counting a release: {e}")
        raise mfusepy.FuseOSError(errno.ENOENT)

    def statfs(self, path: str) -> dict:
        return {"f_bsize": 4096, "f_namemax": names.MAX_NAME}
