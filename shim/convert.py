"""`lazyshim convert`: rewrite an image's layers as eStargz or zstd:chunked and push it.

    lazyshim convert SRC DST [--format estargz|zstd:chunked] [--prioritize FILE-LIST]

SRC is a registry reference or `oci:DIR[:TAG]` (an OCI image layout); DST is a registry
reference.  Each layer is streamed from its source (decompressed while read, its digest
checked at the end), re-encoded by the pure writers in `shim.formats`, and pushed; then a
new config (rootfs.diff_ids of the new tars, history and everything else kept) and an OCI
manifest with the annotations lazy pullers look for.

Memory: the format writers build a layer in memory (all payloads, then the output blob),
so one layer costs about its uncompressed size plus its compressed size while it is
converted, and layers are converted one at a time.  Layers above MAX_LAYER_BYTES
uncompressed are refused with a clear error rather than risking the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import LazyshimError
from .formats import estargz
from .formats.toc import NO_PREFETCH_LANDMARK, PREFETCH_LANDMARK, TOC_TAR_NAME, FormatError, normalize_name
from .registry.manifest import (
    IMAGE_MANIFEST_TYPES,
    OCI_MANIFEST,
    Descriptor,
    Index,
    Manifest,
    compute_digest,
    parse_manifest_document,
    select_platform,
    verify_digest,
)
from .registry.reference import parse_reference

FORMATS = ("estargz", "zstd:chunked")
MAX_LAYER_BYTES = 2 << 30  # uncompressed; the writers hold a whole layer in memory
MAX_CONFIG = 4 << 20
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
_LAYER_TYPES = ("tar", "tar+gzip", "tar+zstd", "tar.gzip", "tar.gz", "diff.tar")
#: Entries a converter adds itself: never carried over from an already converted source.
_OWN_NAMES = frozenset({TOC_TAR_NAME, PREFETCH_LANDMARK, NO_PREFETCH_LANDMARK})
_TAR_READ_TYPES = {
    tarfile.CONTTYPE: tarfile.REGTYPE,  # contiguous files are regular files
    tarfile.AREGTYPE: tarfile.REGTYPE,
}


@dataclass
class ConvertResult:
    digest: str  # the pushed manifest's digest
    reference: str  # where it was pushed
    layers: list[tuple[int, int, int]]  # per layer: (source size, uncompressed size, new size)
    seconds: float


# ------------------------------------------------------------------------------- sources


class _Source:
    """Where the image comes from: a manifest, a config, and layer streams."""

    manifest: Manifest
    name: str

    def config(self) -> bytes:
        raise NotImplementedError

    def stream(self, desc: Descriptor) -> Iterator[bytes]:
        """The blob's bytes; raises at the end if they do not match the digest."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class RegistrySource(_Source):
    def __init__(self, ref_str: str, client_factory: Callable[[str], object]) -> None:
        self.ref = parse_reference(ref_str)
        self.name = str(self.ref)
        self.client = client_factory(self.ref.registry)
        self.manifest = self.client.get_manifest(self.ref.repository, self.ref.digest or self.ref.tag or "latest")

    def config(self) -> bytes:
        return self.client.get_blob(self.ref.repository, self.manifest.config.digest, max_size=MAX_CONFIG)

    def stream(self, desc: Descriptor) -> Iterator[bytes]:
        return self.client.stream_blob(self.ref.repository, desc.digest)

    def close(self) -> None:
        self.client.close()


class OciLayoutSource(_Source):
    """An OCI image layout directory (`index.json`, `blobs/<alg>/<hex>`)."""

    def __init__(self, spec: str) -> None:
        path, tag = _split_oci(spec)
        self.dir = Path(path)
        self.name = f"oci:{spec}"
        try:
            raw_index = (self.dir / "index.json").read_bytes()
        except OSError as e:
            raise LazyshimError(f"{self.name}: not an OCI layout ({e.strerror}: index.json)") from None
        index = parse_manifest_document(raw_index, compute_digest(raw_index), None, f"{self.name} index.json")
        if not isinstance(index, Index):
            raise LazyshimError(f"{self.name}: index.json is not an image index")
        cands = index.manifests
        if tag is not None:
            cands = [d for d in cands if d.annotations.get(REF_NAME_ANNOTATION) == tag]
            if not cands:
                raise LazyshimError(f"{self.name}: no manifest tagged {tag!r} in index.json")
        if len(cands) != 1:
            raise LazyshimError(
                f"{self.name}: index.json lists {len(cands)} manifests; name one as oci:DIR:TAG"
            )
        desc = cands[0]
        for _ in range(4):  # an index may point at a (platform) index
            doc = parse_manifest_document(self._read(desc, MAX_CONFIG), desc.digest, desc.media_type,
                                          f"{self.name} manifest")
            if isinstance(doc, Manifest):
                self.manifest = doc
                return
            desc = select_platform(doc, ("linux", "amd64", None), f"{self.name} index")
        raise LazyshimError(f"{self.name}: image indexes nested too deep")

    def _blob(self, digest: str) -> Path:
        alg, _, hexpart = digest.partition(":")
        return self.dir / "blobs" / alg / hexpart

    def _read(self, desc: Descriptor, limit: int) -> bytes:
        if desc.size > limit:
            raise LazyshimError(f"{self.name}: blob {desc.digest[:19]} is larger than {limit} bytes")
        try:
            data = self._blob(desc.digest).read_bytes()
        except OSError as e:
            raise LazyshimError(f"{self.name}: blob {desc.digest[:19]}: {e.strerror}") from None
        verify_digest(data, desc.digest, f"{self.name}: blob {desc.digest[:19]}")
        return data

    def config(self) -> bytes:
        return self._read(self.manifest.config, MAX_CONFIG)

    def stream(self, desc: Descriptor) -> Iterator[bytes]:
        h = hashlib.new(desc.digest.partition(":")[0])
        try:
            with open(self._blob(desc.digest), "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
                    yield chunk
        except OSError as e:
            raise LazyshimError(f"{self.name}: blob {desc.digest[:19]}: {e.strerror}") from None
        if f"{desc.digest.partition(':')[0]}:{h.hexdigest()}" != desc.digest:
            raise LazyshimError(f"{self.name}: blob {desc.digest[:19]} does not match its digest")


def _split_oci(spec: str) -> tuple[str, str | None]:
    """`DIR[:TAG]`; a DIR that exists as given wins over splitting off a tag."""
    if os.path.isdir(spec) or ":" not in spec:
        return spec, None
    path, _, tag = spec.rpartition(":")
    if "/" in tag or not tag:
        return spec, None
    return path, tag


def open_source(src: str, client_factory: Callable[[str], object]) -> _Source:
    if src.startswith("oci:"):
        return OciLayoutSource(src[len("oci:"):])
    return RegistrySource(src, client_factory)


# ------------------------------------------------------------------------------- layers


def read_layer(chunks: Iterator[bytes], media_type: str, limit: int = MAX_LAYER_BYTES,
               what: str = "layer") -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """Decompress and parse a layer stream into (header, payload) pairs, whole.

    The stream is drained to its end, so a source that checks its digest at the end (the
    registry client, OCI layouts) has checked it before this returns.
    """
    from .legacy import _Decompressed

    if not any(media_type.endswith(t) for t in _LAYER_TYPES):
        raise LazyshimError(f"{what}: cannot convert media type {media_type!r}")
    total = 0
    out: list[tuple[tarfile.TarInfo, bytes | None]] = []
    stream = _Decompressed(chunks, media_type)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for m in tf:
                m.type = _TAR_READ_TYPES.get(m.type, m.type)
                if m.type not in (tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                  tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE):
                    raise LazyshimError(f"{what}: {m.name!r} has unsupported tar type {m.type!r}")
                try:
                    name = normalize_name(m.name) if m.name not in (".", "./", "/") else ""
                except FormatError as e:
                    raise LazyshimError(f"{what}: {e}") from None
                if name in _OWN_NAMES:
                    if m.isreg():
                        tf.extractfile(m).read()  # type: ignore[union-attr]
                    continue
                # Whole seconds: the TOC formats carry no more, and the tar must agree with them.
                m.mtime = int(m.mtime)
                for k in ("mtime", "atime", "ctime"):
                    m.pax_headers.pop(k, None)
                # PAX: an empty value deletes the record (Go's archive/tar, umoci and podman
                # drop such xattrs; Python's tarfile keeps them).
                m.pax_headers = {k: v for k, v in m.pax_headers.items() if v != ""}
                data = None
                if m.isreg():
                    total += m.size
                    if total > limit:
                        raise LazyshimError(
                            f"{what}: more than {limit >> 20} MiB uncompressed; the converter holds a "
                            "layer in memory and refuses larger ones"
                        )
                    f = tf.extractfile(m)
                    data = f.read() if f is not None else b""
                    if len(data) != m.size:
                        raise LazyshimError(f"{what}: truncated file {m.name!r}")
                out.append((m, data))
    except tarfile.TarError as e:
        raise LazyshimError(f"{what}: corrupt tar: {e}") from None
    for _ in chunks:  # past the tar's end-of-archive: finish the stream so its digest is checked
        pass
    return out


@dataclass
class NewLayer:
    blob: bytes
    media_type: str
    diff_id: str
    uncompressed_size: int
    annotations: dict[str, str]

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.blob).hexdigest()


def encode_layer(entries: list, fmt: str, prioritized: list[str] | None = None) -> NewLayer:
    if fmt == "estargz":
        from .formats.estargz_writer import build_estargz

        try:
            lay = build_estargz(entries, prioritized=prioritized)
        except ValueError as e:
            raise LazyshimError(f"eStargz: {e}") from None
        ann = {
            estargz.TOC_DIGEST_ANNOTATION: lay.toc_digest,
            estargz.UNCOMPRESSED_SIZE_ANNOTATION: str(lay.uncompressed_size),
        }
        return NewLayer(lay.blob, MT_GZIP, lay.diff_id, lay.uncompressed_size, ann)
    if fmt == "zstd:chunked":
        from .formats.zstdchunked_writer import build_zstdchunked

        try:
            zl = build_zstdchunked(entries)
        except ValueError as e:
            raise LazyshimError(f"zstd:chunked: {e}") from None
        ann = dict(zl.annotations)
        ann[estargz.UNCOMPRESSED_SIZE_ANNOTATION] = str(zl.uncompressed_size)
        return NewLayer(zl.blob, MT_ZSTD, zl.diff_id, zl.uncompressed_size, ann)
    raise LazyshimError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")


def layer_prioritized(entries: list, wanted: list[str]) -> list[str]:
    """The prioritized paths present in this layer, in the order the list gives them."""
    names = {normalize_name(ti.name) for ti, _ in entries if ti.name not in (".", "./", "/")}
    return [p for p in wanted if p in names]


def read_prioritize_file(path: str) -> list[str]:
    """Absolute paths, one per line (blank lines and `#` comments ignored), normalised."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise LazyshimError(f"--prioritize {path}: {e.strerror}") from None
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("/"):
            raise LazyshimError(f"--prioritize {path}: {line[:80]!r} is not an absolute path")
        try:
            n = normalize_name(line)
        except FormatError as e:
            raise LazyshimError(f"--prioritize {path}: {e}") from None
        if n and n not in out:
            out.append(n)
    return out


# ------------------------------------------------------------------------------- convert


def convert(src: str, dst: str, fmt: str = "estargz", prioritized: list[str] | None = None,
            *, client_factory: Callable[[str], object] | None = None,
            log: Callable[[str], None] | None = None) -> ConvertResult:
    if fmt not in FORMATS:
        raise LazyshimError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if prioritized is not None and fmt != "estargz":
        raise LazyshimError("--prioritize needs --format estargz (zstd:chunked has no landmarks)")
    dref = parse_reference(dst)
    if dref.digest:
        raise LazyshimError(f"{dst}: the destination must be a tag, not a digest")
    if client_factory is None:
        from .sources import new_client

        client_factory = new_client
    log = log or (lambda s: None)
    t0 = time.monotonic()
    source = open_source(src, client_factory)
    dclient = client_factory(dref.registry)
    try:
        manifest = source.manifest
        if manifest.media_type not in IMAGE_MANIFEST_TYPES:
            raise LazyshimError(f"{source.name}: not an image manifest ({manifest.media_type})")
        try:
            config = json.loads(source.config())
        except ValueError:
            raise LazyshimError(f"{source.name}: image config is not JSON") from None
        diff_ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config, dict) else None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(manifest.layers):
            raise LazyshimError(f"{source.name}: config rootfs.diff_ids does not match the layers")
        found: set[str] = set()
        new_descs: list[dict] = []
        new_diff_ids: list[str] = []
        sizes: list[tuple[int, int, int]] = []
        for i, desc in enumerate(manifest.layers):
            what = f"layer {i + 1}/{len(manifest.layers)} {desc.digest[:19]}"
            if desc.urls or "nondistributable" in desc.media_type or "foreign" in desc.media_type:
                raise LazyshimError(f"{what}: foreign (non-distributable) layers cannot be converted")
            t1 = time.monotonic()
            entries = read_layer(source.stream(desc), desc.media_type, what=what)
            prio = None
            if prioritized is not None:
                prio = layer_prioritized(entries, prioritized)
                found.update(prio)
            layer = encode_layer(entries, fmt, prio)
            del entries
            digest = layer.digest
            dclient.push_blob(dref.repository, digest, layer.blob)
            new_descs.append({"mediaType": layer.media_type, "digest": digest, "size": len(layer.blob),
                              "annotations": layer.annotations})
            new_diff_ids.append(layer.diff_id)
            sizes.append((desc.size, layer.uncompressed_size, len(layer.blob)))
            log(f"{what}: {desc.size} -> {len(layer.blob)} bytes ({fmt}, "
                f"{layer.uncompressed_size} uncompressed) in {time.monotonic() - t1:.1f}s")
            del layer
        if prioritized:
            missing = [p for p in prioritized if p not in found]
            if missing:
                log(f"warning: {len(missing)} prioritized path(s) are in no layer, e.g. /{missing[0]}")
        config["rootfs"] = {**config["rootfs"], "diff_ids": new_diff_ids}
        config_raw = json.dumps(config, separators=(",", ":")).encode()
        config_digest = compute_digest(config_raw)
        dclient.push_blob(dref.repository, config_digest, config_raw)
        out: dict = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config_raw)},
            "layers": new_descs,
        }
        ann = manifest.json.get("annotations")
        if isinstance(ann, dict) and ann:
            out["annotations"] = ann
        raw = json.dumps(out, separators=(",", ":")).encode()
        mdigest = dclient.push_manifest(dref.repository, dref.tag or "latest", raw, OCI_MANIFEST)
    finally:
        source.close()
        dclient.close()
    return ConvertResult(mdigest, str(dref), sizes, time.monotonic() - t0)

