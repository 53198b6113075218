"""Which prepared layers become lazy, and making them so through `shim.api` alone.

containerd passes a layer descriptor's `containerd.io/snapshot/*` annotations to the
snapshotter as labels, plus `containerd.io/snapshot.ref` (the chain id it will commit).
Two label sets name the image and the layer:
- stargz-snapshotter's handler (`ctr-remote image rpull`): `.../remote/stargz.reference`
  and `.../remote/stargz.digest`;
- the CRI plugin with `disable_snapshot_annotations = false`: `.../cri.image-ref`,
  `.../cri.layer-digest` and `.../cri.manifest-digest`.
Labels are only hints: the layer's TOC digest is taken from the registry's digest-checked
manifest, so a lying label can at worst make a layer not lazy.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import LazyshimError
from ..formats.toc import FormatError
from ..registry.errors import RegistryError

# What a registry or an image can make go wrong: a pull must survive it (one line, then unpack).
EXPECTED = (LazyshimError, RegistryError, FormatError, ValueError, OSError)

TARGET_REF = "containerd.io/snapshot.ref"
STARGZ_REF = "containerd.io/snapshot/remote/stargz.reference"
STARGZ_DIGEST = "containerd.io/snapshot/remote/stargz.digest"
CRI_REF = "containerd.io/snapshot/cri.image-ref"
CRI_DIGEST = "containerd.io/snapshot/cri.layer-digest"
CRI_MANIFEST = "containerd.io/snapshot/cri.manifest-digest"


@dataclass(frozen=True)
class LayerSource:
    target: str          # the chain id containerd will look the snapshot up by
    image_ref: str
    layer_digest: str
    manifest_digest: str | None


def layer_source(labels: dict[str, str]) -> LayerSource | None:
    """The remote layer a Prepare's labels name, or None (an ordinary Prepare)."""
    target = labels.get(TARGET_REF, "")
    ref = labels.get(STARGZ_REF) or labels.get(CRI_REF)
    digest = labels.get(STARGZ_DIGEST) or labels.get(CRI_DIGEST)
    if not (target and ref and digest):
        return None
    return LayerSource(target, ref, digest, labels.get(CRI_MANIFEST) or None)


class StoreLayers:
    """The lazyshim store, as the snapshotter needs it: build, find, fill and free layers."""

    def __init__(self, store_root: Path) -> None:
        from .. import api

        self.store = api.open_store(store_root)

    def ensure(self, src: LayerSource) -> str | None:
        """The layer's digest once its lazy tree exists, or None if containerd must unpack it
        (no index, or the registry failed: a pull must not fail for want of laziness)."""
        from .. import api

        try:
            tree = api.ensure_lazy_layer(self.store, src.image_ref, src.layer_digest, src.manifest_digest)
        except EXPECTED as e:
            print(f"lazyshim: snapshotter: layer {src.layer_digest[:19]} of {src.image_ref}: {e}; "
                  "containerd unpacks it", file=sys.stderr)
            return None
        return src.layer_digest if tree is not None else None

    def lowerdir(self, digest: str) -> Path:
        from .. import api

        return api.layer_lowerdir(self.store, digest)

    def fill(self, digests: list[str]) -> None:
        """Fill these layers in full: for mounts no supervisor watches (views)."""
        from .. import api

        if digests and not api.layers_complete_in(self.store, digests):
            api.fill_image(self.store, digests)

    def fill_files(self, digests: list[str], paths: tuple[str, ...]) -> None:
        """Fill these few files of these layers now, where they hold them."""
        from .. import api

        if digests:
            api.fill_files_in_layers(self.store, digests, list(paths))

    def sweep(self) -> list[str]:
        """Remove what a killed snapshotter (or pull) left half-built in the store."""
        from .. import api

        return api.sweep_store(self.store)

    def release_unused(self, keep: set[str]) -> list[str]:
        """Free the store's layers that no snapshot (`keep`), image or mount uses."""
        from .. import api

        return api.release_unused_layers(self.store, keep)
