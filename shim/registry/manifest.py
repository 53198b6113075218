"""OCI / Docker schema2 manifests and indexes: media types, parsing, platform selection, digests.

Pure (bytes in, objects out) so it can be tested without a registry.  Manifests come from the
network and are treated as hostile: every descriptor is validated (digest algorithm we can
verify, non-negative bounded size, string annotations) before anything fetches by it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import DigestMismatch, ManifestInvalid, PlatformNotFound, short_digest
from .reference import DIGEST_RE

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
IMAGE_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = IMAGE_MANIFEST_TYPES | INDEX_TYPES
#: Accept header for manifest GETs, most preferred first.
ACCEPT_MANIFESTS = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST])

MAX_MANIFEST_SIZE = 4 << 20  # what distribution itself accepts on push
MAX_DESCRIPTORS = 10_000
MAX_BLOB_SIZE = 1 << 42
MAX_MEDIA_TYPE = 255

Platform = tuple[str, str, str | None]  # (os, architecture, variant)

_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm", "armel": "arm"}
#: The variant an image without one is assumed to be built for (as containerd does).
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says about one blob or child manifest."""

    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    urls: list[str] = field(default_factory=list)
    platform: dict[str, Any] | None = None  # only in index entries; as in the JSON


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI or Docker schema2), already digest-checked.

    `index_digest` is set when the manifest was chosen from an image index, so callers can
    record what the user's tag pointed at.
    """

    digest: str
    media_type: str
    raw: bytes
    json: dict[str, Any]
    config: Descriptor
    layers: list[Descriptor]
    index_digest: str | None = None


@dataclass(frozen=True)
class Index:
    """An OCI image index or Docker manifest list, already digest-checked."""

    digest: str
    media_type: str
    raw: bytes
    json: dict[str, Any]
    manifests: list[Descriptor]


# --------------------------------------------------------------------------- digests


def hasher(digest: str) -> Any:
    """A fresh hashlib object for the algorithm of `digest` (sha256 or sha512)."""
    if not DIGEST_RE.match(digest):
        raise ValueError(f"unsupported or malformed digest {digest!r}")
    return hashlib.sha512() if digest.startswith("sha512:") else hashlib.sha256()


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def verify_digest(data: bytes, digest: str, what: str) -> None:
    """Raise DigestMismatch unless `data` hashes to `digest`."""
    h = hasher(digest)
    h.update(data)
    check_hash(h, digest, what)


def check_hash(h: Any, digest: str, what: str) -> None:
    """Raise DigestMismatch unless the finished hash object `h` matches `digest`."""
    got = f"{digest.split(':', 1)[0]}:{h.hexdigest()}"
    if got != digest:
        raise DigestMismatch(
            f"{what}: content has digest {short_digest(got)}, expected {short_digest(digest)}"
        )


# --------------------------------------------------------------------------- parsing


def _str_dict(value: Any, what: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ManifestInvalid(f"{what}: annotations must map strings to strings")
    return dict(value)


def parse_descriptor(d: Any, what: str) -> Descriptor:
    """Validate one descriptor object; raise ManifestInvalid with a one-line reason."""
    if not isinstance(d, dict):
        raise ManifestInvalid(f"{what}: descriptor is not an object")
    mt = d.get("mediaType")
    if not isinstance(mt, str) or not mt or len(mt) > MAX_MEDIA_TYPE or not mt.isprintable():
        raise ManifestInvalid(f"{what}: descriptor has no valid mediaType")
    digest = d.get("digest")
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise ManifestInvalid(f"{what}: descriptor digest {str(digest)[:80]!r} is not sha256/sha512")
    size = d.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= MAX_BLOB_SIZE:
        raise ManifestInvalid(f"{what}: descriptor {short_digest(digest)} has invalid size {str(size)[:40]}")
    urls = d.get("urls") or []
    if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
        raise ManifestInvalid(f"{what}: descriptor {short_digest(digest)} has invalid urls")
    platform = d.get("platform")
    if platform is not None and not isinstance(platform, dict):
        raise ManifestInvalid(f"{what}: descriptor {short_digest(digest)} has invalid platform")
    return Descriptor(mt, digest, size, _str_dict(d.get("annotations"), what), list(urls), platform)


def _descriptors(value: Any, what: str) -> list[Descriptor]:
    if not isinstance(value, list):
        raise ManifestInvalid(f"{what}: expected a list of descriptors")
    if len(value) > MAX_DESCRIPTORS:
        raise ManifestInvalid(f"{what}: more than {MAX_DESCRIPTORS} descriptors")
    return [parse_descriptor(d, what) for d in value]


def parse_manifest_document(raw: bytes, digest: str, content_type: str | None, what: str) -> Manifest | Index:
    """Parse raw manifest bytes (already digest-checked) into a Manifest or an Index.

    The JSON `mediaType` wins over the HTTP Content-Type; a document that looks like both
    an index and a manifest is rejected, as the OCI spec recommends.
    """
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ManifestInvalid(f"{what}: not valid JSON") from None
    except RecursionError:  # a few MB of `[` fit under MAX_MANIFEST_SIZE
        raise ManifestInvalid(f"{what}: JSON nested too deeply") from None
    if not isinstance(doc, dict):
        raise ManifestInvalid(f"{what}: not a JSON object")
    if doc.get("schemaVersion") != 2:
        raise ManifestInvalid(f"{what}: schemaVersion {str(doc.get('schemaVersion'))[:20]} is not supported")
    mt = doc.get("mediaType")
    if mt is None:
        ct = (content_type or "").split(";", 1)[0].strip()
        if ct in MANIFEST_TYPES:
            mt = ct
        elif "manifests" in doc:
            mt = OCI_INDEX
        else:
            mt = OCI_MANIFEST
    if not isinstance(mt, str):
        raise ManifestInvalid(f"{what}: mediaType is not a string")
    if mt in DOCKER_SCHEMA1:
        raise ManifestInvalid(f"{what}: Docker schema 1 manifests are not supported")
    if mt not in MANIFEST_TYPES:
        raise ManifestInvalid(f"{what}: unsupported manifest media type {mt[:80]!r}")
    if "manifests" in doc and ("layers" in doc or "config" in doc):
        raise ManifestInvalid(f"{what}: document is both an index and a manifest")
    if mt in INDEX_TYPES:
        return Index(digest, mt, raw, doc, _descriptors(doc.get("manifests"), what))
    config = parse_descriptor(doc.get("config"), what + " config")
    return Manifest(digest, mt, raw, doc, config, _descriptors(doc.get("layers"), what + " layers"))


# --------------------------------------------------------------------------- platforms


def normalise_platform(os_: str, arch: str, variant: str | None) -> Platform:
    """Map aliases (`x86_64`, `aarch64`) and fill the default variant, for comparisons."""
    arch = _ARCH_ALIASES.get(arch, arch)
    variant = variant or _DEFAULT_VARIANT.get(arch)
    if arch == "arm64" and variant == "v8.0":
        variant = "v8"
    return (os_, arch, variant)


def _descriptor_platform(d: Descriptor) -> Platform | None:
    p = d.platform or {}
    os_, arch, variant = p.get("os"), p.get("architecture"), p.get("variant")
    if not isinstance(os_, str) or not isinstance(arch, str):
        return None
    return normalise_platform(os_, arch, variant if isinstance(variant, str) and variant else None)


def select_platform(index: Index, platform: Platform, what: str) -> Descriptor:
    """The index entry for `platform`; raise PlatformNotFound listing what is available.

    With no variant requested, an entry with the architecture's default variant (or none)
    is preferred, then any variant; with a variant requested it must match.
    """
    want_os, want_arch, want_variant = platform
    want = normalise_platform(want_os, want_arch, want_variant)
    candidates: list[tuple[Platform, Descriptor]] = []
    for d in index.manifests:
        if d.media_type not in IMAGE_MANIFEST_TYPES:
            continue  # nested indexes, attestations with unusual types
        p = _descriptor_platform(d)
        if p is not None and p[:2] == want[:2]:
            candidates.append((p, d))
    for p, d in candidates:
        if p == want:
            return d
    if want_variant is None and candidates:
        return candidates[0][1]
    available = sorted(
        {"/".join(x for x in p if x) for p in map(_descriptor_platform, index.manifests) if p is not None}
    )
    asked = "/".join(x for x in platform if x)
    raise PlatformNotFound(f"{what}: no manifest for {asked} (available: {', '.join(available) or 'none'})")
