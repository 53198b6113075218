"""The layers the layer store serves: found in the store, or pulled lazily on first lookup.

A lookup names an image reference and a layer digest.  The layer's descriptor, and so the
digest of its table of contents, comes from the registry's digest-checked manifest of that
reference (through the node's mirrors, as every lazyshim pull), never from the name alone.
Only eStargz and zstd:chunked layers are served: for any other layer `entry` returns None and
podman downloads it itself.  A pulled layer is published as the store's own layer-store entry
(`shim.store.als`), so after a restart its `info` comes from disk without a registry.

Concurrency: one lock per (reference, layer) in this process, so two lookups at once pull
once; the store's per-layer lock keeps other processes out of the build.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import LazyshimError
from ..store import als
from ..store.layout import Store

#: How long a reference's manifest and config are reused: one podman pull looks up every
#: layer of the image within seconds, a later pull of a moved tag must see the new manifest.
MANIFEST_TTL = 60.0
MAX_CONFIG = 4 << 20


@dataclass(frozen=True)
class Entry:
    """What the layer store shows for one layer: the `info` record and the blob's size."""

    ref: str
    digest: str
    info: bytes
    blob_size: int


class NotServed(Exception):
    """The layer is not one we make lazy (podman downloads it itself): ENOENT, not an error."""


class StoreLayers:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._entries: dict[tuple[str, str], Entry] = {}
        self._manifests: dict[str, tuple[float, object, dict]] = {}
        self._blob_locks: dict[str, threading.Lock] = {}

    def _key_lock(self, table: dict, key) -> threading.Lock:
        with self._lock:
            lock = table.get(key)
            if lock is None:
                lock = table[key] = threading.Lock()
            return lock

    # ---- entries ---------------------------------------------------------------------------
    def entry(self, ref: str, digest: str) -> Entry:
        """The layer's entry, pulled lazily now if it is not in the store.  Raises NotServed
        (not lazy, not in the manifest) or LazyshimError (registry, image or store failed)."""
        key = (ref, digest)
        hit = self._entries.get(key)
        if hit is not None and self._built(digest):
            return hit
        with self._key_lock(self._locks, key):
            hit = self._entries.get(key)
            if hit is None or not self._built(digest):  # new, or collected since (`lazyshim gc`)
                hit = self._from_store(ref, digest) or self._pull(ref, digest)
                self._entries[key] = hit
            return hit

    def _built(self, digest: str) -> bool:
        from ..store.layouts import has_meta

        return has_meta(self.store.layer_dir(digest))

    def _from_store(self, ref: str, digest: str) -> Entry | None:
        info = als.read_info(self.store, ref, digest)
        if info is None or not self._built(digest):
            return None
        return Entry(ref, digest, json.dumps(info).encode(), info["compressed-size"])

    def _pull(self, ref_str: str, digest: str) -> Entry:
        from ..pull import ensure_layer, layer_format
        from ..registry.reference import parse_reference
        from ..sources import pull_client

        ref = parse_reference(ref_str)
        self.store.ensure()
        with pull_client(ref.registry, ref.repository, digested=ref.digest is not None) as client:
            manifest, config = self._manifest(ref_str, ref, client, digest)
            index = next((i for i, d in enumerate(manifest.layers) if d.digest == digest), None)
            if index is None:
                raise NotServed(f"manifest {manifest.digest[:19]} of {ref_str} has no layer {digest[:19]}")
            desc = manifest.layers[index]
            if layer_format(desc) == "legacy":
                raise NotServed(f"layer {digest[:19]} of {ref_str} has no verifiable index")
            with self.store.lock("gc", shared=True):  # no collection between building and publishing
                meta = ensure_layer(self.store, client, ref, desc)
                diff_ids = als.diff_ids_of(config)
                diff_id = diff_ids[index] if index < len(diff_ids) else None
                als.publish_layer(self.store, ref_str, meta, diff_id, self.diff(digest))
        info = als.layer_info(meta, diff_id)
        return Entry(ref_str, digest, json.dumps(info).encode(), meta.blob_size)

    def _manifest(self, ref_str: str, ref, client, digest: str):
        """The reference's manifest and config, reused for MANIFEST_TTL unless it lacks the
        layer asked for (a tag that moved since)."""
        hit = self._manifests.get(ref_str)
        if hit is not None and time.monotonic() - hit[0] < MANIFEST_TTL and any(
                d.digest == digest for d in hit[1].layers):
            return hit[1], hit[2]
        manifest = client.get_manifest(ref.repository, ref.reference)
        raw = client.get_blob(ref.repository, manifest.config.digest, max_size=MAX_CONFIG)
        try:
            config = json.loads(raw)
        except (ValueError, RecursionError):
            raise LazyshimError(f"{ref_str}: image config is not JSON") from None
        if not isinstance(config, dict):
            raise LazyshimError(f"{ref_str}: image config is not a JSON object")
        self._manifests[ref_str] = (time.monotonic(), manifest, config)
        return manifest, config

    def diff(self, digest: str) -> Path:
        """The layer's tree (v2: its read-only view, mounted again if a reboot took it)."""
        from ..api import layer_lowerdir

        return layer_lowerdir(self.store, digest)

    # ---- blobs -----------------------------------------------------------------------------
    def open_blob(self, entry: Entry) -> int:
        """A read-only fd of the layer's whole blob, downloaded into the store first (through
        the mirrors, its digest checked before it is renamed into place): no byte is served
        that was not verified."""
        from ..registry.reference import parse_reference
        from ..sources import pull_client
        from ..store.blobs import blob_path, fetch_blob

        path = blob_path(self.store, entry.digest)
        if not path.is_file():
            with self._key_lock(self._blob_locks, entry.digest):
                if not path.is_file():
                    ref = parse_reference(entry.ref)
                    with pull_client(ref.registry, ref.repository, digested=ref.digest is not None) as client:
                        fetch_blob(self.store, client, ref.repository, entry.digest)
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

    # ---- podman's use ----------------------------------------------------------------------
    def use(self, digest: str) -> int:
        return als.count_use(self.store, digest, +1)

    def release(self, digest: str) -> int:
        return als.count_use(self.store, digest, -1)
