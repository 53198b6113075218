"""Start-up profiles published beside their image, as an OCI artifact, so other nodes start warm.

    <registry>/<repository>:sha256-<manifest hex>.lazyshim-profile

One artifact per image: an OCI image manifest whose `artifactType` (and its one layer's media
type) is `application/vnd.lazyshim.profile.v1+json`, with the empty config, and whose layer is
what `lazyshim profile export` writes (a JSON list of the image's profiles).  A tag rather than
the referrers API, which Distribution 2.8 lacks; the image's digest in the tag ties the two.

What comes back from a registry is hostile like a profile file: the blob is bounded and
digest-checked by the client, every profile in it is checked as `import` checks it, and only
profiles of that image are kept (renamed to the repository the store knows it by).
"""

from __future__ import annotations

import json

from .errors import LazyshimError
from .store import profiles
from .store.layout import Store

ARTIFACT_TYPE = "application/vnd.lazyshim.profile.v1+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
TAG_SUFFIX = ".lazyshim-profile"


def tag_for(image_id: str) -> str:
    return image_id.replace(":", "-", 1) + TAG_SUFFIX


def push(store: Store, ref: str) -> str:
    """Publish the profiles of the pulled image `ref` beside it; returns the artifact's reference."""
    from .registry.manifest import OCI_MANIFEST, compute_digest
    from .sources import new_client
    from .store.refs import resolve_image

    rec = resolve_image(store, ref)
    found = [p for _, p in profiles.listing(store) if p.image == rec.id]
    if not found:
        raise LazyshimError(f"no profile of {ref!r} to push (a supervised run of it records one)")
    blob = json.dumps([profiles.to_doc(p) for p in found]).encode()
    config = b"{}"
    client = new_client(rec.registry)
    try:
        client.push_blob(rec.repository, compute_digest(blob), blob)
        client.push_blob(rec.repository, compute_digest(config), config)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
            "config": {"mediaType": EMPTY_CONFIG, "digest": compute_digest(config), "size": len(config)},
            "layers": [{"mediaType": ARTIFACT_TYPE, "digest": compute_digest(blob), "size": len(blob)}],
            "annotations": {"run.lazyshim.profile.image": rec.id},
        }).encode()
        client.push_manifest(rec.repository, tag_for(rec.id), manifest, OCI_MANIFEST)
    finally:
        client.close()
    return f"{rec.registry}/{rec.repository}:{tag_for(rec.id)}"


def pull(store: Store, ref: str) -> int:
    """Fetch the profiles published beside the pulled image `ref` into the store; returns how
    many.  A registry without them is a one-line error."""
    from .sources import pull_client
    from .store.refs import resolve_image

    rec = resolve_image(store, ref)
    tag = tag_for(rec.id)
    client = pull_client(rec.registry, rec.repository, digested=False)
    manifest = client.get_manifest(rec.repository, tag, platform=None)
    if len(manifest.layers) != 1 or manifest.layers[0].media_type != ARTIFACT_TYPE:
        raise LazyshimError(f"{rec.registry}/{rec.repository}:{tag} is not a lazyshim profile artifact")
    layer = manifest.layers[0]
    if layer.size > profiles.MAX_IMPORT_BYTES:
        raise LazyshimError(f"{rec.registry}/{rec.repository}:{tag}: profile of {layer.size} bytes is too large")
    data = client.get_blob(rec.repository, layer.digest, max_size=profiles.MAX_IMPORT_BYTES)
    got = [p for p in profiles.parse_many(data) if p.image == rec.id]
    for p in got:
        p.registry, p.repository = rec.registry, rec.repository
        p.updated = 0.0  # saved as new
        profiles.save(store, p)
    return len(got)
