"""Expose pulled layers to podman as an *additional layer store* (containers/storage).

With `additionallayerstores = ["STORE/als:ref"]` in storage.conf, podman's pull looks for
`STORE/als/<base64(image ref)>/<layer digest>/{diff,info,blob}` and, when it finds them,
uses `diff` as the layer's lower dir instead of downloading the blob.  We point `diff` at
the layer's tree (v1: the placeholder tree; v2: a read-only overlay of its metadata tree over
the data objects, so an unfilled file fails to open instead of reading as zeros), so `podman
pull` becomes manifest + config only and `podman run --runtime lazyshim` gets a rootfs whose
lower dirs are ours.

`info` is the containers/storage Layer record (digests and sizes); `blob` is read only by
podman's save/push/build: it links to the whole blob, which `lazyshim fetch --blobs` stores
(`shim.store.blobs`); until then podman's read of it fails (an error, never corrupt bytes).

The same entries are what the layer store that pulls on lookup (`shim.alsfs`) serves from
its FUSE mount: it writes them here when a lookup pulls a layer, and reads them back after a
restart.  It also counts podman's use of each layer (`use` created, the layer dir removed):
a layer podman holds is never collected (`used_layers`).
"""

from __future__ import annotations

import base64
import json
import os
import threading
from pathlib import Path

from ..errors import LazyshimError
from .blobs import reserve_blob
from .layout import Store, digest_dirname
from .metadata import ImageRecord, LayerMeta

COMPRESSION_GZIP = 2  # containers/storage archive.Compression
COMPRESSION_ZSTD = 4
MAX_INFO = 64 << 10

_uses_lock = threading.Lock()


def als_root(store: Store) -> Path:
    return store.root / "als"


def ref_dir(store: Store, ref: str) -> Path:
    return als_root(store) / base64.standard_b64encode(ref.encode()).decode()


def publish(store: Store, rec: ImageRecord, metas: list[LayerMeta], refs: list[str]) -> None:
    """Write the ALS entries of an image under every name podman may look it up by."""
    diff_ids = diff_ids_of(rec.config)
    from .layouts import layout_of

    layout = layout_of(store)
    diffs = [layout.layer_view(meta.digest) for meta in metas]  # (re)mounts v2's read-only views
    for ref in dict.fromkeys(refs):
        for i, meta in enumerate(metas):
            publish_layer(store, ref, meta, diff_ids[i] if i < len(diff_ids) else None, diffs[i])


def layer_info(meta: LayerMeta, diff_id: str | None) -> dict:
    """The containers/storage Layer record of a lazy layer (podman reads it as `info`)."""
    info = {
        "compressed-diff-digest": meta.digest,
        "compressed-size": meta.blob_size,
        "diff-size": meta.table.regular_bytes(),
        "compression": COMPRESSION_ZSTD if meta.format == "zstd:chunked" else COMPRESSION_GZIP,
    }
    if diff_id is not None:
        info["diff-digest"] = diff_id
    return info


def publish_layer(store: Store, ref: str, meta: LayerMeta, diff_id: str | None, diff: Path) -> None:
    """One layer's entry under one name (kept if it exists; built aside and renamed in)."""
    base = ref_dir(store, ref)
    target = base / meta.digest
    if (target / "info").exists():
        return
    tmp = base / f".{meta.digest}.{os.getpid()}.{threading.get_ident()}"
    tmp.mkdir(parents=True, exist_ok=True)
    for name in ("diff", "blob", "info"):
        (tmp / name).unlink(missing_ok=True)
    os.symlink(diff, tmp / "diff")
    os.symlink(reserve_blob(store, meta.digest), tmp / "blob")  # a stand-in until `fetch --blobs`
    (tmp / "info").write_text(json.dumps(layer_info(meta, diff_id)))
    try:
        os.rename(tmp, target)
    except OSError:  # a concurrent pull published it first
        for name in ("diff", "blob", "info"):
            (tmp / name).unlink(missing_ok=True)
        tmp.rmdir()


def read_info(store: Store, ref: str, digest: str) -> dict | None:
    """The `info` record published for (ref, layer), or None if there is none (or it is not
    a record of this layer: the store's own file, still read with bounds)."""
    digest_dirname(digest)
    try:
        with open(ref_dir(store, ref) / digest / "info", "rb") as f:
            raw = f.read(MAX_INFO + 1)
    except (OSError, ValueError):  # ValueError: a name too long for a path
        return None
    try:
        info = json.loads(raw) if len(raw) <= MAX_INFO else None
    except ValueError:
        return None
    if not isinstance(info, dict) or info.get("compressed-diff-digest") != digest:
        return None
    if not isinstance(info.get("compressed-size"), int) or info["compressed-size"] < 0:
        return None
    return info


def diff_ids_of(config: dict) -> list[str | None]:
    """The config's `rootfs.diff_ids`, from registry-supplied JSON: an entry that is not a
    digest string is left out of podman's layer record (None), never passed on or raised on."""
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list):
        return []
    return [d if isinstance(d, str) and d.startswith("sha256:") else None for d in ids]


# ---- podman's use of layers ------------------------------------------------------------------

def _uses_file(store: Store, digest: str) -> Path:
    return store.root / "als-uses" / digest_dirname(digest)


def count_use(store: Store, digest: str, delta: int) -> int:
    """Add `delta` to the number of podman layers that use this layer (never below 0); returns
    the new count.  One file per layer, rewritten whole under the store's lock."""
    path = _uses_file(store, digest)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    with _uses_lock, store.lock("als-uses"):
        try:
            now = int(path.read_text() or "0")
        except (OSError, ValueError):
            now = 0
        now = max(0, now + delta)
        if now:
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(str(now))
            os.replace(tmp, path)
        else:
            path.unlink(missing_ok=True)
    return now


def used_layers(store: Store) -> set[str]:
    """Layer dir names (`sha256-<hex>`) that podman uses through the layer store."""
    try:
        names = os.listdir(store.root / "als-uses")
    except OSError:
        return set()
    return {n for n in names if not n.startswith(".")}



def hold_serving(store: Store, mountpoint: str) -> int:
    """Hold the lock that says a layer store serves `mountpoint` from this store (an fd to
    keep open while serving); LazyshimError if another process holds it."""
    import fcntl
    import hashlib

    lockdir = store.root / "locks"
    lockdir.mkdir(mode=0o700, exist_ok=True)
    name = "layer-store-" + hashlib.sha256(mountpoint.encode()).hexdigest()[:16]
    fd = os.open(lockdir / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LazyshimError(f"another layer store serves {mountpoint} from {store.root}") from None
    return fd
