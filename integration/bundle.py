"""Run a pushed test image under plain runc: the baseline every lazy variant must match.

Why not podman: the point is to check the image itself (its files, links, interpreter chain) with
the fewest moving parts; podman adds storage drivers and conmon. The image is copied out of the
registry with skopeo (so we test what was pushed), unpacked with umoci, and run with a default
``runc spec`` whose args we replace. runc state lives in a private ``--root`` so nothing is left in
/run/runc.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from integration.images import PrivateEnv, skopeo_copy


class BundleError(RuntimeError):
    """Preparing or running the bundle failed."""


@dataclass(frozen=True)
class RunResult:
    """What a container printed and how it exited."""

    returncode: int
    stdout: str
    stderr: str


def _check(argv: Sequence[str], timeout: float = 120, cwd: Path | None = None) -> str:
    """Run a helper tool and return stdout; one-line error with the stderr tail on failure."""
    if shutil.which(argv[0]) is None:
        raise BundleError(f"{argv[0]} not found (run `make apt`)")
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise BundleError(f"{' '.join(argv[:3])} ... failed ({proc.returncode}): {tail}")
    return proc.stdout


def bundle_from_registry(ref: str, workdir: Path) -> Path:
    """Pull ``ref`` (``127.0.0.1:PORT/name:tag``) over plain HTTP and unpack it into an OCI bundle.

    Returns the bundle directory (``config.json`` from ``runc spec``, ``rootfs/`` from umoci).
    """
    layout = workdir / "layout"
    bundle = workdir / "bundle"
    # Through the images module's private environment: a plain root skopeo would create
    # /var/lib/containers/cache, the blob-info cache that makes podman push stale gzip blobs.
    skopeo_copy(f"docker://{ref}", f"oci:{layout}:img", PrivateEnv(workdir / "containers"), preserve=False)
    _check(["umoci", "unpack", "--image", f"{layout}:img", str(bundle)])
    (bundle / "config.json").unlink()  # umoci's spec; replaced by runc's default below
    _check(["runc", "spec", "--bundle", str(bundle)])
    return bundle


def run_in_bundle(
    bundle: Path,
    args: Sequence[str],
    *,
    env: Sequence[str] = ("PATH=/usr/local/bin:/usr/bin:/bin",),
    timeout: float = 60,
) -> RunResult:
    """Run ``args`` as a new container from ``bundle`` with ``runc run`` and a unique id.

    The process runs without a terminal so its output can be captured; ``runc run`` waits for it
    and removes the container afterwards.
    """
    config_path = bundle / "config.json"
    config = json.loads(config_path.read_text())
    config["process"]["args"] = list(args)
    config["process"]["env"] = list(env)
    config["process"]["terminal"] = False
    config["root"] = {"path": "rootfs", "readonly": False}
    config_path.write_text(json.dumps(config))
    state = bundle.parent / "runc-state"
    state.mkdir(exist_ok=True)
    cid = f"lazyshim-it-{uuid.uuid4().hex[:12]}"
    argv = ["runc", "--root", str(state), "run", "--bundle", str(bundle), cid]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        subprocess.run(["runc", "--root", str(state), "delete", "--force", cid], capture_output=True)
        raise BundleError(f"container {cid} ({args[0]}) did not finish within {timeout}s") from None
    return RunResult(proc.returncode, proc.stdout, proc.stderr)
