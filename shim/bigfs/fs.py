"""The FUSE operations: a read-only tree of object names, each a `BigFile`.

Paths are the data layer's object names (`objects/ab/<hex>`, `entries/<layer>/<index>`),
so a metacopy file's redirect finds the same name here as in the data layer.  Only what a
read-only lower layer of overlayfs needs: getattr, readdir, open, read.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable

import mfusepy as fuse

from .chunked import BigFile, ChunkError
from .touched import Recorder
from .warm import Readers, fetch_whole, is_dense


class BigFS(fuse.Operations):
    use_ns = True

    def __init__(self, files: dict[str, BigFile], log: Callable[[str], None],
                 on_init: Callable[[], None] | None = None, recorder: Recorder | None = None,
                 readers: Readers | None = None) -> None:
        """`recorder`: where each chunk's first touch is noted (file i of its list is the i-th
        of `files`); `readers`: the readers' fetches, which the background yields to."""
        self.files = {"/" + k: f for k, f in files.items()}
        self._by_fh = list(self.files.values())
        self._fh = {p: i for i, p in enumerate(self.files)}
        self._dirs: dict[str, set[str]] = {"/": set()}
        for p in self.files:
            parts = p.strip("/").split("/")
            for i in range(len(parts)):
                parent = "/" + "/".join(parts[:i]) if i else "/"
                self._dirs.setdefault(parent, set()).add(parts[i])
                if i < len(parts) - 1:
                    self._dirs.setdefault("/" + "/".join(parts[: i + 1]), set())
        self._log = log
        self._on_init = on_init
        self._recorder = recorder
        self._readers = readers or Readers()
        self._dense_checked: set[int] = set()  # files whose chunk 0 was looked at (by id)

    def init(self, path: str) -> None:
        if self._on_init is not None:
            self._on_init()

    def getattr(self, path: str, fh: int | None = None) -> dict:
        f = self.files.get(path)
        if f is not None:
            ns = f.entry.mtime * 1_000_000_000
            return {"st_mode": stat.S_IFREG | 0o444, "st_nlink": 1, "st_size": f.entry.size,
                    "st_mtime": ns, "st_ctime": ns, "st_atime": ns}
        if path in self._dirs:
            return {"st_mode": stat.S_IFDIR | 0o555, "st_nlink": 2}
        raise fuse.FuseOSError(errno.ENOENT)

    def readdir(self, path: str, fh: int) -> list[str]:
        names = self._dirs.get(path)
        if names is None:
            raise fuse.FuseOSError(errno.ENOENT)
        return [".", "..", *sorted(names)]

    def open(self, path: str, flags: int) -> int:
        fh = self._fh.get(path)
        if fh is None:
            raise fuse.FuseOSError(errno.ENOENT)
        if flags & 3 != 0:  # O_WRONLY / O_RDWR
            raise fuse.FuseOSError(errno.EROFS)
        return fh

    def _maybe_dense(self, f: BigFile) -> None:
        """After a read that fetched: an executable or library is read nearly whole, so its
        other chunks come now, several at once, rather than one fault after another."""
        if id(f) in self._dense_checked or not f.verified[0]:
            return
        self._dense_checked.add(id(f))
        if is_dense(f):
            self._log(f"{f.entry.name!r} is an ELF file: its other chunks are fetched now")
            fetch_whole(f, self._log)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        f = self._by_fh[fh]
        chunks = f.chunk_range(offset, size)
        if self._recorder is not None:
            self._recorder.touch(fh, chunks)  # before the fetch: the order is that of first need
        readers = self._readers
        if not readers.first_read.is_set():
            readers.first_read.set()
        try:
            if all(f.verified[k] for k in chunks):
                return f.read(offset, size)
            with readers.fetching():
                data = f.read(offset, size)
            self._maybe_dense(f)
            return data
        except ChunkError as e:
            self._log(f"read of {f.entry.name!r} at {offset}: {e}")
            raise fuse.FuseOSError(errno.EIO) from None
        except OSError as e:
            self._log(f"read of {f.entry.name!r} at {offset}: {e}")
            raise fuse.FuseOSError(errno.EIO) from None
