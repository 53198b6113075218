"""Big files filled chunk by chunk (store layout v2): their partial data, until complete.

    STORE/partial/<object name>     a sparse file of the big file's size; verified chunks are
                                    written in place, holes are chunks not fetched yet

A partial file is only a cache: its bytes are served to no one before the process serving
them has checked each chunk against its digest (a chunk is re-verified on its first use by
every process, so a crash that left a chunk half-written costs a refetch, never a wrong
byte).  Once every chunk is verified (and the whole-file digest, if the TOC has one), the
file is flushed and linked into the data layer under its object name (`shim.store.objects`),
where overlayfs finds it before the FUSE layer: containers started after that read it
natively.  The partial name is then removed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .layout import Store

_PARTIAL = "partial"
_HINT = "largest-chunked"  # in a layer dir: the size of its largest file a FUSE layer could serve


def partial_root(store: Store) -> Path:
    return store.root / _PARTIAL


def partial_path(store: Store, object_name: str) -> Path:
    return partial_root(store) / object_name


def object_path(store: Store, object_name: str) -> Path:
    """Where the data layer holds a complete object (the v2 layout's data dir)."""
    from .layouts import layout_of

    return layout_of(store).data_root / object_name


def largest_chunked(store: Store, digest: str, compute: Callable[[], int]) -> int:
    """The size of the layer's largest file that could be served chunk by chunk (0: none),
    remembered in the layer dir: most containers have no big file, and this answers that
    without loading the layer's metadata."""
    path = store.layer_dir(digest) / _HINT
    try:
        return int(path.read_bytes())
    except (OSError, ValueError):
        pass
    n = compute()
    try:
        from .metadata import write_atomic

        write_atomic(path, str(n).encode())
    except OSError:
        pass  # a read-only or full store: computed again next time
    return n


def remember_largest_chunked(layer_dir: Path, n: int) -> None:
    """Write `largest_chunked`'s answer into a layer dir being built (the pull has the
    entries at hand; the first `lazyshim run` would otherwise load the layer's metadata
    just to learn that it has no big file)."""
    (layer_dir / _HINT).write_bytes(str(n).encode())


def open_partial(store: Store, object_name: str, size: int) -> int:
    """An fd (read-write) of the object's partial file, created sparse at `size` if new."""
    path = partial_path(store, object_name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o444)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)  # new, or a damaged one: its holes are refetched
    except BaseException:
        os.close(fd)
        raise
    return fd


def publish(store: Store, object_name: str) -> None:
    """The partial file is complete and verified: make it the object (same inode, linked; an
    object already there, from a whole-file fill, wins) and drop the partial name.  No flush
    here: as for any object, a layer marks it only after a flush (`filler.Syncer`), and an
    unmarked object after a crash is collected (`objects.recover_unflushed`)."""
    final = object_path(store, object_name)
    final.parent.mkdir(parents=True, exist_ok=True)
    src = partial_path(store, object_name)
    try:
        os.link(src, final)
    except FileExistsError:
        pass
    src.unlink(missing_ok=True)


def collect(store: Store, names: set[str]) -> tuple[int, int]:
    """Delete partial files no layer of the store names (the caller holds the gc lock)."""
    files = size = 0
    root = partial_root(store)
    if not root.is_dir():
        return 0, 0
    for top in root.iterdir():
        for sub in top.iterdir() if top.is_dir() else ():
            for f in sub.iterdir() if sub.is_dir() else ():
                if f"{top.name}/{sub.name}/{f.name}" in names:
                    continue
                try:
                    n = f.lstat().st_blocks * 512
                    f.unlink()
                except OSError:
                    continue
                files += 1
                size += n
    return files, size
