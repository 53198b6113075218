"""Time `lazyshim pull`, a full `lazyshim fetch` and `podman pull` of one big image on one
registry (not part of `make test`: it builds and converts a few hundred MB).

    .venv/bin/python -m integration.timing [--dirs DIR ...] [--zstd] [--keep]

The image is made from host directories (one layer per --dirs entry, colon-separated
paths within a layer) with integration/images.py's deterministic OCI writer, pushed as
plain gzip, converted by `lazyshim convert` (eStargz, and zstd:chunked with --zstd), and
then pulled by each tool into private, fresh stores on the same loopback registry.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from integration.images import ImageSpec, PrivateEnv, _finish, _LayerBuilder, skopeo_copy, write_oci_layout
from integration.registry import Registry

DEFAULT_DIRS = [
    "/usr/lib/python3.11:/usr/lib/python3",
    "/usr/share/doc",
    "/usr/share/perl:/usr/lib/x86_64-linux-gnu/perl-base:/usr/lib/x86_64-linux-gnu/gconv",
]
LAZYSHIM = [sys.executable, "-m", "runtime.main"]


def build_spec(layer_dirs: list[str]) -> ImageSpec:
    layers = []
    for spec in layer_dirs:
        b = _LayerBuilder()
        for d in spec.split(":"):
            if os.path.isdir(d):
                b.tree(d, {"__pycache__"})
        layers.append(_finish(b))
    return ImageSpec("big", layers, cmd=["/bin/sh"])


def timed(argv: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.monotonic()
    p = subprocess.run(argv, env=env, capture_output=True, text=True)
    dt = time.monotonic() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:5])} ... failed: {p.stderr.strip()[-400:]}")
    return dt


def podman_argv(root: Path) -> list[str]:
    return ["podman", "--root", str(root / "root"), "--runroot", str(root / "run"), "--storage-driver", "overlay",
            "--events-backend", "none", "--cgroup-manager", "cgroupfs", "--tmpdir", str(root / "tmp")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dirs", nargs="+", default=DEFAULT_DIRS)
    ap.add_argument("--zstd", action="store_true", help="also convert to and time zstd:chunked")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="lzt-"))  # short: podman limits the runroot length
    rows: list[tuple[str, str, float]] = []
    try:
        t0 = time.monotonic()
        layout = work / "layout"
        write_oci_layout(build_spec(args.dirs), layout, "legacy")
        blobs = sum(f.stat().st_size for f in (layout / "blobs/sha256").iterdir())
        print(f"built OCI layout ({blobs / 1e6:.0f} MB of blobs) in {time.monotonic() - t0:.0f}s", flush=True)
        with Registry() as reg:
            penv = PrivateEnv(work / "containers")
            legacy = f"{reg.host}/big:legacy"
            skopeo_copy(f"oci:{layout}:legacy", f"docker://{legacy}", penv)
            env = dict(os.environ, LAZYSHIM_ROOT=str(work / "unused"))
            variants = [("estargz", f"{reg.host}/big:esgz")]
            if args.zstd:
                variants.append(("zstd:chunked", f"{reg.host}/big:zstdchunked"))
            for fmt, ref in variants:
                dt = timed([*LAZYSHIM, "convert", legacy, ref, "--format", fmt], env)
                rows.append((f"lazyshim convert legacy -> {fmt}", "", dt))
            for fmt, ref in [("legacy gzip", legacy), *variants]:
                store = work / f"store-{len(rows)}"
                env = dict(os.environ, LAZYSHIM_ROOT=str(store))
                rows.append((f"lazyshim pull ({fmt})", ref, timed([*LAZYSHIM, "pull", ref], env)))
                rows.append((f"lazyshim fetch ({fmt})", ref, timed([*LAZYSHIM, "fetch", ref], env)))
                from shim import api

                api.release_store(store)
                shutil.rmtree(store, ignore_errors=True)
                pdir = work / f"p{len(rows)}"
                penv_run = dict(penv.env(f"podman-{len(rows)}"))
                rows.append((f"podman pull ({fmt})", ref, timed(
                    [*podman_argv(pdir), "pull", "-q", "--tls-verify=false", f"docker://{ref}"], penv_run)))
                subprocess.run([*podman_argv(pdir), "rmi", "-af"], capture_output=True, env=penv_run)
                shutil.rmtree(pdir, ignore_errors=True)
    finally:
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"{'step':40} {'seconds':>8}")
    for what, _ref, dt in rows:
        print(f"{what:40} {dt:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
