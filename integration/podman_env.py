"""A private podman for the tests: its own roots, and storage.conf naming one additional
layer store (lazyshim's static one under a store, or the FUSE layer store's mount point)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
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
