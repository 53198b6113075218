"""File data by content digest (store layout v2): one object per file content, shared by
every layer and image that holds that file.

    STORE/data/objects/<2 hex>/<64 hex>      a regular file's bytes, named by its sha256
    STORE/data/entries/<alg>-<hex>/<index>   a file whose TOC entry has no whole-file digest
                                             (its chunks are still verified one by one)

`STORE/data` is an overlayfs data-only lower layer: its files are reachable only through the
`trusted.overlay.redirect` of a metacopy file in a metadata tree, never by name.  An object
is written under a temporary name in STORE/tmp, verified and renamed into place, so it is
either absent (the reader's open fails with ENOENT) or complete: no reader ever sees a hole.
Empty files need no object (their metadata file is the whole file).

The rename is the commit and does not wait for the disk: a layer's byte map marks an object
only after a batched flush (`filler.Syncer`).  A boot that did not flush (power loss) may
leave an object renamed but holding a hole; `recover_unflushed` deletes every object no mark
names, once, before the first unflushed object of a new boot.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ..formats.toc import Entry, FormatError
from ..formats.toctable import REG, TocTable
from .filler import SYNCER, BlobSource, Fetched, FillError, LayerFiller
from .layout import digest_dirname
from .metadata import LayerMeta

_HEX = frozenset("0123456789abcdef")
_TMP_SEQ = itertools.count(1)  # temporary names unique in this process (next() is atomic)
_OBJECT_LOCKS: dict[str, list] = {}  # object path -> [lock, holders and waiters]
_OBJECT_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _object_lock(path: Path) -> Iterator[None]:
    """One lock per object in this process: two entries (of any layers) with the same content,
    opened at once, make one fetch; the second finds the object the first renamed in.  A lock
    lives only while someone holds or waits for it: one per object ever filled would grow
    with every file of the image."""
    key = str(path)
    with _OBJECT_LOCKS_GUARD:
        slot = _OBJECT_LOCKS.get(key)
        if slot is None:
            slot = _OBJECT_LOCKS[key] = [threading.Lock(), 0]
        slot[1] += 1
    try:
        with slot[0]:
            yield
    finally:
        with _OBJECT_LOCKS_GUARD:
            slot[1] -= 1
            if not slot[1]:
                del _OBJECT_LOCKS[key]


def object_name(layer_digest: str, idx: int, e: Entry) -> str | None:
    """Where entry idx's data lives below the data dir, or None when it needs no object.

    The name comes from a (digest-verified) TOC, but is checked like hostile input anyway:
    only lowercase hex reaches the path."""
    if e.type != "reg" or not e.size:
        return None
    return _name_of(layer_digest, idx, e.digest)


def table_object_name(layer_digest: str, table: TocTable, idx: int) -> str | None:
    """`object_name` of entry idx of a table, without making its Entry."""
    if table.kind[idx] != REG or not table.size[idx]:
        return None
    return _name_of(layer_digest, idx, table.digest_of(idx))


def _name_of(layer_digest: str, idx: int, digest: str | None) -> str:
    alg, _, hexpart = (digest or "").partition(":")
    if alg == "sha256" and len(hexpart) == 64 and _HEX.issuperset(hexpart):
        return f"objects/{hexpart[:2]}/{hexpart}"
    return f"entries/{digest_dirname(layer_digest)}/{idx}"


def collect_unnamed(data_dir: Path, tmp_dir: Path, names: set[str]) -> tuple[int, int]:
    """Delete objects no name in `names` refers to, and temporaries of processes that are gone.

    Directories stay (a fill may be renaming into one).  The caller holds the store's gc lock
    exclusively, so no pull adds a layer meanwhile; fills only make objects of layers that
    exist, whose names are in `names`."""
    files = size = 0
    for top in ("objects", "entries"):
        base = data_dir / top
        if not base.is_dir():
            continue
        for sub in base.iterdir():
            for f in sub.iterdir() if sub.is_dir() else ():
                if f"{top}/{sub.name}/{f.name}" in names:
                    continue
                try:
                    n = f.lstat().st_size
                    f.unlink()
                except OSError:
                    continue
                files += 1
                size += n
    for f in tmp_dir.glob(".object.*"):
        pid = f.name.split(".")[2]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            f.unlink(missing_ok=True)
    return files, size


_BOOT_MARK = "unflushed-boot"
_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def recover_unflushed(tmp_dir: Path, collect: Callable[[], object]) -> None:
    """Before this boot renames its first unflushed object into the store: if an earlier boot
    may have left unflushed objects (its id is recorded and differs), `collect` deletes every
    object no layer's byte map marks (a refetch, never a hole).  Then this boot is recorded
    (durably: a crash of this boot must be seen by the next)."""
    try:
        with open(_BOOT_ID) as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    mark = tmp_dir / _BOOT_MARK
    fd = os.open(mark, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        recorded = os.pread(fd, 64, 0).decode(errors="replace").strip()
        if recorded == boot and boot:
            return
        if recorded:
            collect()
        os.ftruncate(fd, 0)
        os.pwrite(fd, boot.encode(), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(tmp_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class ObjectFiller(LayerFiller):
    """Fills a layer whose tree is metadata only: a fill creates the file's data object.

    `filled` (the layer's byte map) is a hint shared by the store's processes; the truth is
    the object itself, so a file another layer or image brought in is found by one stat."""

    def __init__(self, layer_dir: Path, meta: LayerMeta, source_factory: Callable[[], BlobSource],
                 data_dir: Path, tmp_dir: Path) -> None:
        self.data_dir = data_dir
        self._data_prefix = os.fspath(data_dir) + "/"  # is_filled's stat takes a str: no Path per call
        self.tmp_dir = tmp_dir
        super().__init__(layer_dir, meta, source_factory, tree=data_dir)

    def object_path(self, idx: int) -> Path | None:
        """Made on each call (a microsecond) rather than cached: a cache of every file's name
        would be the biggest thing in a supervisor's memory after the first recount."""
        name = table_object_name(self.meta.digest, self.meta.table, idx)
        return None if name is None else self.data_dir / name

    def is_filled(self, idx: int) -> bool:
        if self.filled[idx] or self.ready[idx]:
            return True
        name = table_object_name(self.meta.digest, self.meta.table, idx)
        if name is None:
            return False
        try:
            st = os.stat(self._data_prefix + name)
        except OSError:
            return False
        if st.st_size != self.meta.table.size[idx]:
            return False
        self.ready[idx] = 1  # another layer, image or container brought it in
        SYNCER.add(self, [idx])  # marked once flushed: it may not be on disk yet
        return True

    def _check_marks(self) -> None:
        """A mark whose object is gone (deleted by gc or by recovery): refetch those."""
        for i in self.meta.table.data_files():
            if self.filled[i]:
                name = table_object_name(self.meta.digest, self.meta.table, i)
                if name is None or not os.path.exists(self._data_prefix + name):
                    self.filled[i] = 0

    def _fill_locked(self, idx: int, fetched: Fetched | None = None) -> bool:
        final = self.object_path(idx)
        if final is None or self.is_filled(idx):
            return False
        with _object_lock(final):
            if self.is_filled(idx):
                return False  # an entry with the same content was filled meanwhile
            return self._write_object(idx, fetched)

    def _write_object(self, idx: int, fetched: Fetched | None) -> bool:
        e = self.meta.toc.entries[idx]
        tmp = self.tmp_dir / f".object.{os.getpid()}.{next(_TMP_SEQ)}"
        try:
            tmp.unlink(missing_ok=True)  # left by a crashed process that had our pid
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        except OSError as err:
            raise FillError(f"filling {e.name!r}: {err}") from err
        try:
            try:
                os.ftruncate(fd, e.size)  # zero chunks stay holes: they read as the zeros they are
                self._write_verified(fd, e, fetched)
            finally:
                os.close(fd)
            self._publish(idx, tmp)
        except BaseException as err:
            tmp.unlink(missing_ok=True)  # verified pieces of a failed file never become an object
            if isinstance(err, OSError | FormatError):
                raise FillError(f"filling {e.name!r}: {err}") from err
            raise
        self._commit(idx)
        return True

    def _publish(self, idx: int, tmp: Path) -> None:
        final = self.object_path(idx)
        assert final is not None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, final)  # a concurrent fill of the same content renames equal bytes
        except OSError as err:
            raise FillError(f"storing {self.meta.toc.entries[idx].name!r}: {err}") from err
