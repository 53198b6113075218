"""Reading overlay lower dirs out of mountinfo, podman's relative links included."""

from __future__ import annotations

import os
from pathlib import Path

from shim.store.mounts import overlay_mounts


def test_podman_relative_links_resolve_to_our_trees(tmp_path: Path) -> None:
    store_tree = tmp_path / "store/layers/sha256-ab/tree"
    store_tree.mkdir(parents=True)
    graph = tmp_path / "graph/overlay"
    (graph / "l").mkdir(parents=True)
    (graph / "L1/").mkdir()
    os.symlink(store_tree, graph / "L1/diff")  # podman's layer dir -> layer store -> our tree
    os.symlink("../L1/diff", graph / "l/ABC")
    merged = graph / "ctr/merged"
    line = (f"51 47 0:41 / {merged} rw,relatime - overlay overlay "
            f"rw,lowerdir=l/ABC:/plain\\040dir,upperdir={graph}/ctr/diff,workdir={graph}/ctr/work")
    mounts = list(overlay_mounts(line + "\n52 47 0:42 / /proc rw - proc proc rw\n"))
    assert mounts[0] == (str(merged), [os.path.realpath("/plain dir"), str(store_tree.resolve())])
    assert mounts[1] == ("/proc", [])
