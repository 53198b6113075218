"""A private podman for the tests: its own roots, and storage.conf naming one additional
layer store (lazyshim's static one under a store, or the FUSE layer store's mount point)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from integration.test_runtime_cli import LAZYSHIM, sh


@contextlib.contextmanager
def private_podman(layer_store: str | Path, prefix: str) -> Iterator[tuple[list[str], dict[str, str]]]:
    """(podman argv with `--runtime lazyshim`, its environment); everything it made is removed
    after.  Roots come from storage.conf only: podman drops the conf's [storage.options] (the
    layer store) when --root/--runroot/--storage-driver are given on its command line."""
    top = Path(tempfile.mkdtemp(prefix=prefix))  # podman wants a runroot shorter than 50 chars
    conf = top / "storage.conf"
    conf.write_text(
        '[storage]\ndriver = "overlay"\n'
        f'graphroot = "{top}/root"\nrunroot = "{top}/run"\n'
        f'[storage.options]\nadditionallayerstores = ["{layer_store}:ref"]\n')
    argv = ["podman", "--cgroup-manager", "cgroupfs", "--events-backend", "none", "--runtime", LAZYSHIM]
    env = {k: v for k, v in os.environ.items() if k != "LAZYSHIM_ROOT"}  # podman does not pass it on anyway
    env["CONTAINERS_STORAGE_CONF"] = str(conf)
    try:
        yield argv, env
    finally:
        sh(*argv, "rm", "--all", "--force", env=env)
        sh(*argv, "rmi", "--all", "--force", env=env)
        subprocess.run(["umount", "-R", "-l", f"{top}/root/overlay"], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


def saved_layer_diff_ids(archive: Path) -> list[str]:
    """The diff_ids of the layers in a `podman save --format oci-archive` tarball, after
    checking that every blob in it is what its name says."""
    with tarfile.open(archive) as t:
        blobs = {m.name.rsplit("/", 1)[1]: t.extractfile(m).read() for m in t.getmembers()  # type: ignore[union-attr]
                 if m.isfile() and m.name.startswith("blobs/sha256/")}
        index = json.loads(t.extractfile("index.json").read())  # type: ignore[union-attr]
    assert all(hashlib.sha256(data).hexdigest() == name for name, data in blobs.items())
    manifest = json.loads(blobs[index["manifests"][0]["digest"].split(":")[1]])
    out = []
    for layer in manifest["layers"]:
        data = blobs[layer["digest"].split(":")[1]]
        out.append("sha256:" + hashlib.sha256(gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).hexdigest())
    return out
