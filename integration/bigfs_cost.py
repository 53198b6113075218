"""What the FUSE layer of big files costs on reads of chunks it has cached already.

    .venv/bin/python -m integration.bigfs_cost [--mib 64]

Pulls the "weights" image (eStargz) from a private loopback registry into a private store,
mounts the FUSE layer of its big file (`python -m shim.bigfs`) and reads the first --mib MiB
once to cache and verify those chunks.  Then, with every chunk cached:
- `fuse-cold`: 1 MiB reads through FUSE, its page cache dropped for the file (fadvise): what a
  container pays on the first read of a cached chunk;
- `fuse-mmap-cold`: the same through a mapping, one byte per 4 KiB page;
- `fuse-warm`: the same reads again (the kernel's page cache: `kernel_cache`);
- `native`: 1 MiB reads of the same bytes from the store's file on disk (page cache warm),
  what a complete file costs through overlayfs' native data layer.
Not part of `make test`: figures for the README.
"""

from __future__ import annotations

import argparse
import mmap
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from integration import weights_image
from integration.images import build_and_push
from integration.registry import Registry

MIB = 1 << 20


def _read_all(path: Path, n: int, cold: bool) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        if cold:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        t0 = time.perf_counter()
        for off in range(0, n, MIB):
            os.pread(fd, MIB, off)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def _touch_pages(path: Path, n: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        m = mmap.mmap(fd, n, prot=mmap.PROT_READ)
        t0 = time.perf_counter()
        s = 0
        for off in range(0, n, 4096):
            s += m[off]
        dt = time.perf_counter() - t0
        m.close()
        return dt
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64)
    a = ap.parse_args(argv)
    n = a.mib * MIB
    weights_image.register()
    with tempfile.TemporaryDirectory(prefix="bigfs-cost-") as tmp_s, Registry() as reg:
        tmp = Path(tmp_s)
        ref = build_and_push(reg, names=["weights"], variants=("legacy", "esgz"))["weights:esgz"]
        env = dict(os.environ, LAZYSHIM_ROOT=str(tmp / "store"), LAZYSHIM_STORE_LAYOUT="v2")
        subprocess.run([sys.executable, "-m", "runtime.main", "pull", "-q", ref], env=env, check=True)
        from shim.bigfs import threshold
        from shim.store.layout import Store

        store = Store(tmp / "store")
        layers = [p.name.replace("-", ":", 1) for p in sorted(store.layers.iterdir())]
        mnt = tmp / "big"
        mnt.mkdir()
        r, w = os.pipe()
        proc = subprocess.Popen([sys.executable, "-m", "shim.bigfs", "--store", str(store.root), "--layers",
                                 ",".join(layers), "--mount", str(mnt), "--threshold", str(threshold()),
                                 "--ready-fd", str(w), "--log", str(tmp / "bigfs.log")], pass_fds=(w,), env=env)
        os.close(w)
        try:
            if os.read(r, 1) != b"1":
                raise SystemExit(f"bigfs did not start: {(tmp / 'bigfs.log').read_text()}")
            big = next(mnt.rglob("*"), None)
            while big is not None and big.is_dir():
                big = next(big.iterdir())
            assert big is not None
            partial = next(p for p in (store.root / "partial").rglob("*") if p.is_file())
            t_fetch = _read_all(big, n, cold=True)
            results = {
                "fetch+verify (first read, loopback)": t_fetch,
                "fuse-cold": min(_read_all(big, n, cold=True) for _ in range(5)),
                "fuse-mmap-cold": min(_touch_pages(big, n) for _ in range(5)),
                "fuse-warm": min(_read_all(big, n, cold=False) for _ in range(5)),
                "native": min(_read_all(partial, n, cold=False) for _ in range(5)),
            }
        finally:
            from shim.store.layouts import release
            from shim.store.sysmount import detach

            detach(mnt)
            proc.terminate()
            proc.wait()
            release(store)
        for name, t in results.items():
            print(f"{name:40s} {t * 1000:8.1f} ms for {a.mib} MiB  {a.mib / t:8.0f} MiB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
