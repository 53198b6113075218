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
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from .blobs import reserve_blob
from .layout import Store
from .metadata import ImageRecord, LayerMeta

COMPRESSION_GZIP = 2  # containers/storage archive.Compression
COMPRESSION_ZSTD = 4


def als_root(store: Store) -> Path:
    return store.root / "als"


def ref_dir(store: Store, ref: str) -> Path:
    return als_root(store) / base64.standard_b64encode(ref.encode()).decode()


def publish(store: Store, rec: ImageRecord, metas: list[LayerMeta], refs: list[str]) -> None:
    """Write the ALS entries of an image under every name podman may look it up by."""
    diff_ids = _diff_ids(rec.config)
    from .layouts import layout_of

    layout = layout_of(store)
    diffs = [layout.layer_view(meta.digest) for meta in metas]  # (re)mounts v2's read-only views
    for ref in dict.fromkeys(refs):
        base = ref_dir(store, ref)
        for i, meta in enumerate(metas):
            target = base / meta.digest
            if (target / "info").exists():
                continue
            tmp = base / f".{meta.digest}.{os.getpid()}"
            tmp.mkdir(parents=True, exist_ok=True)
            os.symlink(diffs[i], tmp / "diff")
            os.symlink(reserve_blob(store, meta.digest), tmp / "blob")  # a stand-in until `fetch --blobs`
            info = {
                "compressed-diff-digest": meta.digest,
                "compressed-size": meta.blob_size,
                "diff-size": meta.table.regular_bytes(),
                "compression": COMPRESSION_ZSTD if meta.format == "zstd:chunked" else COMPRESSION_GZIP,
            }
            if i < len(diff_ids) and diff_ids[i] is not None:
                info["diff-digest"] = diff_ids[i]
            (tmp / "info").write_text(json.dumps(info))
            try:
                os.rename(tmp, target)
            except OSError:  # a concurrent pull published it first
                for name in ("diff", "blob", "info"):
                    (tmp / name).unlink(missing_ok=True)
                tmp.rmdir()


def _diff_ids(config: dict) -> list[str | None]:
    """The config's `rootfs.diff_ids`, from registry-supplied JSON: an entry that is not a
    digest string is left out of podman's layer record (None), never passed on or raised on."""
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list):
        return []
    return [d if isinstance(d, str) and d.startswith("sha256:") else None for d in ids]
