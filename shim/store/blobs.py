"""Whole compressed layer blobs, kept only when asked (`lazyshim fetch --blobs`).

A lazy store never needs them to run anything, but podman's `save`, `push` and `build FROM`
read a layer's `blob` from the additional layer store and check its digest.  The layer store's
`blob` is a link to `STORE/blobs/<alg>-<hex>`, which must exist for podman to use the layer
at all: until the blob is fetched it is an empty directory (podman's read then fails with "is a
directory": an error, never corrupt bytes); afterwards it is the registry's exact blob,
verified while it streamed in, written to a temporary name and renamed into place.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import LazyshimError
from .layout import Store, digest_dirname


def blob_path(store: Store, digest: str) -> Path:
    return store.root / "blobs" / digest_dirname(digest)


def reserve_blob(store: Store, digest: str) -> Path:
    """The path the layer store links to: the blob, or a directory standing in for it."""
    final = blob_path(store, digest)
    final.parent.mkdir(mode=0o700, exist_ok=True)
    try:
        final.mkdir(mode=0o500)
    except FileExistsError:
        pass
    return final


def fetch_blob(store: Store, client, repository: str, digest: str) -> int:
    """Download one blob into the store unless it is there; returns the bytes downloaded."""
    final = reserve_blob(store, digest)
    if final.is_file():
        return 0
    tmp = store.tmp / f".blob.{os.getpid()}.{digest_dirname(digest)}"
    n = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in client.stream_blob(repository, digest):  # raises on a digest mismatch at the end
                f.write(chunk)
                n += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        try:
            final.rmdir()  # the stand-in (a concurrent fetch may have replaced it already)
        except NotADirectoryError:
            pass
        os.rename(tmp, final)
    except OSError as e:
        raise LazyshimError(f"storing blob {digest[:19]}: {e.strerror}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return n


def forget_blob(store: Store, digest: str) -> None:
    p = blob_path(store, digest)
    try:
        p.rmdir()
    except NotADirectoryError:
        p.unlink(missing_ok=True)
    except FileNotFoundError:
        pass
