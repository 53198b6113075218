"""`lazyshim pull`: manifest, config and tables of contents only.

The config and all layers are fetched side by side.  For an eStargz layer one range request
for the blob's tail usually brings both the footer and the TOC (else a second one brings the
rest of the TOC); the TOC is checked against the digest the (digest-verified) manifest
carries, and the layer's metadata tree is built.
A layer whose TOC cannot be verified (no eStargz/zstd:chunked annotation) is not lazy: it
is streamed, checked against its blob digest and unpacked in full, so every image runs.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import TypeVar

from .errors import LazyshimError
from .formats import estargz
from .formats.toc import FormatError, Toc
from .registry.client import Descriptor, RegistryClient
from .registry.reference import Reference, parse_reference
from .store import refs
from .store.filler import create_filled_map
from .store.layout import Store
from .store.layouts import disk_tree, has_meta, layout_of, read_meta, write_meta
from .store.metadata import ImageRecord, LayerMeta, dump_image, write_atomic
from .store.placeholders import TreeOptions

MAX_CONFIG = 4 << 20
#: Layers pulled at once (and the config beside them): enough to overlap the round trips of
#: a typical image, few enough not to open a connection per layer of a 100-layer one.
MAX_PARALLEL = 8
#: Bounds of the first (tail) request of an eStargz layer: see tail_size.
MIN_TAIL = 64 << 10
MAX_TAIL = 512 << 10
T = TypeVar("T")


# progress(index, count, layer, meta): before a layer (meta None) and after it.
PullProgress = Callable[[int, int, Descriptor, "LayerMeta | None"], None]


def pull(ref_str: str, store: Store, client: RegistryClient | None = None,
         progress: PullProgress | None = None) -> ImageRecord:
    """Pull through the image's mirrors and then its origin (see shim.sources), unless the
    caller brings its own client."""
    ref = parse_reference(ref_str)
    store.ensure()
    own = client is None
    if client is None:
        from .sources import pull_client

        client = pull_client(ref.registry, ref.repository, digested=ref.digest is not None)
    try:
        with store.lock("gc", shared=True):  # no collection may delete our layers before the record
            return _pull(ref, ref_str, store, client, progress)
    finally:
        if own:
            client.close()


def _pull(ref: Reference, ref_str: str, store: Store, client: RegistryClient,
          progress: PullProgress | None = None) -> ImageRecord:
    manifest = client.get_manifest(ref.repository, ref.digest or ref.tag or "latest")
    # The config and every layer's table of contents at once: on a link with a round trip
    # of 20 ms, one after another cost a round trip (or two) each.
    with ThreadPoolExecutor(max_workers=MAX_PARALLEL, thread_name_prefix="lazyshim-pull") as pool:
        config_job = pool.submit(client.get_blob, ref.repository, manifest.config.digest, max_size=MAX_CONFIG)
        metas = _ensure_layers(pool, store, client, ref, manifest.layers, progress)
        config_raw = config_job.result()
    try:
        config = json.loads(config_raw)
    except (ValueError, RecursionError):  # RecursionError: a few MB of `[` fit under MAX_CONFIG
        raise LazyshimError(f"{ref_str}: image config is not JSON") from None
    if not isinstance(config, dict):
        raise LazyshimError(f"{ref_str}: image config is not a JSON object")
    layout = layout_of(store)
    for meta in metas:
        layout.activate(meta.digest, meta)
    rec = ImageRecord(
        id=manifest.digest, name=str(ref), registry=ref.registry, repository=ref.repository,
        layers=[d.digest for d in manifest.layers], config=config, config_digest=manifest.config.digest,
    )
    write_atomic(store.image_file(rec.id), dump_image(rec))
    refs.set_ref(store, str(ref), rec.id)
    from .store import als

    als.publish(store, rec, metas, [ref_str, str(ref)])
    return rec


def _ensure_layers(pool: ThreadPoolExecutor, store: Store, client: RegistryClient, ref: Reference,
                   layers: list[Descriptor], progress: PullProgress | None) -> list[LayerMeta]:
    """Every layer's metadata, the layers pulled side by side (each layer digest once: two
    builders of one digest in one process would share a staging name).  If one fails, the
    others are waited for (or cancelled) before its error is raised, so nothing is left
    half-built and no image record names a layer that is not there."""
    lock = threading.Lock()
    count = len(layers)

    def one(i: int, layer: Descriptor) -> LayerMeta:
        if progress:
            with lock:
                progress(i, count, layer, None)
        meta = ensure_layer(store, client, ref, layer)
        if progress:
            with lock:
                progress(i, count, layer, meta)
        return meta

    jobs: dict[str, Future[LayerMeta]] = {}
    for i, layer in enumerate(layers):
        if layer.digest not in jobs:
            jobs[layer.digest] = pool.submit(one, i, layer)
    done = {}
    try:
        for digest, job in jobs.items():
            done[digest] = job.result()
    except BaseException:
        for job in jobs.values():
            job.cancel()
        wait(jobs.values())
        raise
    return [done[layer.digest] for layer in layers]


def ensure_layer(store: Store, client: RegistryClient, ref: Reference, desc: Descriptor) -> LayerMeta:
    """Make the layer's tree and metadata exist in the store (idempotent, crash-safe)."""
    final = store.layer_dir(desc.digest)
    if has_meta(final):
        return _load(final)
    layout = layout_of(store)
    with store.lock(final.name):
        if has_meta(final):
            return _load(final)
        staging = store.tmp / f"{final.name}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            meta = _lazy_meta(client, ref, desc)
            opts = TreeOptions()
            if meta is None:
                from .legacy import unpack_layer

                disk_tree(staging).mkdir()
                meta = unpack_layer(client, ref, desc, disk_tree(staging), opts)
                create_filled_map(staging, len(meta.toc.entries), all_filled=True)
            else:
                layout.populate(meta, staging, opts)
                create_filled_map(staging, len(meta.toc.entries))
            _warn_skipped(desc, opts)
            meta.registry, meta.repository = ref.registry, ref.repository
            from .bigfs.plan import largest
            from .store.partials import remember_largest_chunked

            remember_largest_chunked(staging, largest(meta))  # before the meta: renamed in with it
            write_meta(staging, meta)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return meta


def _warn_skipped(desc: Descriptor, opts: TreeOptions) -> None:
    """Say which entries a rootless store could not hold (never drop them silently)."""
    if opts.skipped:
        import sys

        names = ", ".join(opts.skipped[:5]) + (" ..." if len(opts.skipped) > 5 else "")
        print(f"lazyshim: warning: layer {desc.digest[:19]}: {len(opts.skipped)} device nodes under /dev not "
              f"created without privilege (the container's /dev is mounted over them): {names}", file=sys.stderr)


def _load(layer_dir: Path) -> LayerMeta:
    return read_meta(layer_dir)


def layer_format(desc: Descriptor) -> str:
    """Which reader a layer needs, from its (verified) manifest annotations alone."""
    ann = desc.annotations or {}
    from .formats import zstdchunked

    if "zstd" in desc.media_type:
        loc = zstdchunked.manifest_location(ann)
        # Without the manifest checksum the TOC cannot be trusted: no laziness then.
        return "zstd:chunked" if loc is not None and loc.checksum else "legacy"
    if estargz.TOC_DIGEST_ANNOTATION in ann:
        return "estargz"
    return "legacy"


def _lazy_meta(client: RegistryClient, ref: Reference, desc: Descriptor) -> LayerMeta | None:
    fmt = layer_format(desc)
    try:
        if fmt == "estargz":
            return _estargz_meta(client, ref, desc)
        if fmt == "zstd:chunked":
            return _zstd_meta(client, ref, desc)
    except FormatError as e:
        raise LazyshimError(f"layer {desc.digest[:19]}: {e}") from e
    return None


def _checked_range(client: RegistryClient, ref: Reference, desc: Descriptor, start: int, end: int,
                   check: Callable[[bytes], T]) -> T:
    """check(the bytes of [start, end)): through mirrors, bytes that `check` refuses
    (FormatError) are read again from the next endpoint, as a failed request would be."""
    from .endpoints import BadContent

    get = getattr(client, "get_checked_range", None)
    if get is None:
        return check(client.get_range(ref.repository, desc.digest, start, end))
    try:
        return get(ref.repository, desc.digest, start, end, check)
    except BadContent as e:
        raise FormatError(str(e)) from e


def tail_size(blob_size: int) -> int:
    """How many bytes at the end of an eStargz blob the first request asks for: the footer
    and, usually, the whole TOC behind it, so that one round trip brings both.  A TOC grows
    with the layer's file count, which grows (loosely) with its size: 1/100 of the blob,
    at least 64 KiB, at most 512 KiB (about twice the TOC of the bench's Debian layers, at
    1/170-1/210 of theirs: what is read for nothing stays under a round trip's worth of bytes
    at 100 Mbit/s).  A TOC that does not fit costs a second
    request for the part before the tail, as the footer and the TOC cost two before."""
    return min(blob_size, max(MIN_TAIL, min(blob_size // 100, MAX_TAIL)))


def _estargz_meta(client: RegistryClient, ref: Reference, desc: Descriptor) -> LayerMeta:
    size = desc.size
    if size < estargz.FOOTER_SIZE:
        raise FormatError("blob too small for eStargz")
    want = desc.annotations[estargz.TOC_DIGEST_ANNOTATION]
    tail_start = size - tail_size(size)

    def from_tail(tail: bytes) -> tuple[int, int, int, bytes, Toc | None]:
        if len(tail) != size - tail_start:
            raise FormatError("short tail of the blob")
        toc_offset, footer_size = estargz.parse_footer(tail)
        start, end = estargz.toc_range(size, toc_offset, footer_size)  # bounded: inside the blob, <= 64 MiB
        if start < tail_start:
            return toc_offset, start, end, tail, None
        view = memoryview(tail)[start - tail_start:end - tail_start]
        return toc_offset, start, end, b"", estargz.read_toc(view, toc_offset, want)

    # Parsed as it is checked: bytes a mirror got wrong (footer, digest, format) are read from the next endpoint.
    toc_offset, start, end, tail, toc = _checked_range(client, ref, desc, tail_start, size, from_tail)
    if toc is None:  # the TOC begins before the tail: fetch only what is missing
        held = memoryview(tail)[:end - tail_start]
        try:
            toc = _checked_range(client, ref, desc, start, tail_start,
                                 lambda head: estargz.read_toc(head + held, toc_offset, want))
        except FormatError:  # perhaps the tail was the wrong part: the whole region, checked on its own
            toc = _checked_range(client, ref, desc, start, end,
                                 lambda region: estargz.read_toc(region, toc_offset, want))
    return LayerMeta(digest=desc.digest, format="estargz", blob_size=size, toc=toc, toc_digest=want)


def _zstd_meta(client: RegistryClient, ref: Reference, desc: Descriptor) -> LayerMeta:
    from .formats import zstdchunked

    loc = zstdchunked.manifest_location(desc.annotations)
    if loc is None or loc.offset + loc.length > desc.size:
        raise FormatError("zstd:chunked manifest position lies outside the blob")
    toc = _checked_range(client, ref, desc, loc.offset, loc.offset + loc.length,
                         lambda region: zstdchunked.read_toc(region, loc))
    return LayerMeta(digest=desc.digest, format="zstd:chunked", blob_size=desc.size, toc=toc,
                     toc_digest=loc.checksum)
