"""What tests need to look inside a store, whatever its layout (v1 placeholder trees, v2
metadata trees over data objects): the store itself owns those names."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from shim.store.layout import Store
from shim.store.layouts import MountSpec, layout_of, load_meta


def layout_name(store: Path) -> str:
    return layout_of(Store(store)).name


def layer_trees(store: Path) -> list[Path]:
    """Every pulled layer's tree (an overlay lower dir), in layer-dir order."""
    s = Store(store)
    layout = layout_of(s)
    out = []
    for d in sorted(s.layers.iterdir()):
        digest = d.name.replace("-", ":", 1)
        layout.activate(digest)
        out.append(layout.lower_dir(digest))
    return out


def image_mount(store: Path, ref: str) -> MountSpec:
    from shim import api

    s = api.open_store(store)
    return api.layer_mount(s, api.ensure_image(s, ref, pull=False))


def overlay_options(spec: MountSpec) -> str:
    """`lowerdir=...` (top first, `::` data layers) plus the spec's options, for mount -o."""
    opts = "lowerdir=" + ":".join(str(p) for p in reversed(spec.lowers))
    opts += "".join(f"::{d}" for d in spec.data_lowers)
    return ",".join([opts, *spec.options])


def has_data(store: Path, digest: str, idx: int) -> bool:
    """Entry idx of the layer has its content in the store (filled), by the layout's own test."""
    s = Store(store)
    layout = layout_of(s)

    def no_source():
        raise AssertionError("nothing is fetched here")

    return layout.filler(digest, load_meta(s, digest), no_source).is_filled(idx)


def file_filled(store: Path, path: str) -> bool:
    """The image file at `path` (the topmost layer holding it) has its content in the store."""
    s = Store(store)
    name = path.lstrip("/")
    found = None
    for d in sorted(s.layers.iterdir()):
        digest = d.name.replace("-", ":", 1)
        for i, e in enumerate(load_meta(s, digest).toc.entries):
            if e.name == name and e.type == "reg":
                found = (digest, i)
    assert found is not None, f"{path} is in no layer"
    return has_data(store, *found)


_STORE_MOUNT = re.compile(r"^/.+/meta$")


def store_mounts() -> set[str]:
    """Mount points of stores' metadata tmpfs (v2) in this mount namespace."""
    out = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            parts = line.split(" ")
            if len(parts) > 9 and "-" in parts:
                fstype = parts[parts.index("-") + 1]
                if fstype == "tmpfs" and _STORE_MOUNT.match(parts[4]):
                    out.add(parts[4])
    return out


def release_store_mounts_below(root: Path) -> None:
    """Detach the metadata tmpfs (and the views on it) of every store below `root`."""
    for mp in store_mounts():
        if mp.startswith(f"{root}/"):
            subprocess.run(["umount", "-R", "-l", mp], capture_output=True)
