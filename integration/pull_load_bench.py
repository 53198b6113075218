"""`lazyshim pull` of a many-entry image, store layout v1 vs v2 (and `podman pull` of the same
image), on an idle disk and while a `dd` of 2 GB (O_DIRECT) writes beside it on the same disk.

    .venv/bin/python -m integration.pull_load_bench [--entries 10000] [--runs 3] [--memory]

The image is synthetic (eStargz, ENTRIES small files in 100-file directories) and served by a
private registry on loopback; each pull uses a fresh store in a temp dir on the disk under
test (the repository's file system).  For v2 it also reports the metadata tmpfs's size;
`--memory` instead measures the kernel memory a v2 tree takes: Slab+Shmem that unmounting the
store's tmpfs frees after a pull (a delta on a shared machine: run it a few times).
Not part of `make test`; the dd file lives in the temp dir and is deleted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAZYSHIM = str(Path(sys.executable).parent / "lazyshim")


def synthetic_image(registry, entries: int) -> str:
    from integration.test_image_core import MT_GZIP, _ti, push_image
    from shim.formats import estargz
    from shim.formats.estargz_writer import build_estargz

    items = []
    for i in range(entries):
        if i % 100 == 0:
            items.append((_ti(f"d{i // 100}", b"5"), None))
        else:
            items.append((_ti(f"d{i // 100}/f{i}"), f"file {i}\n".encode() * 8))
    lay = build_estargz(items, level=1)
    ann = {estargz.TOC_DIGEST_ANNOTATION: lay.toc_digest}
    return push_image(registry.host, "pullbench", f"e{entries}", [(lay.blob, MT_GZIP, ann, lay.diff_id)])


def timed_podman_pull(ref: str, base: Path) -> tuple[float, str]:
    """podman's own pull (download + unpack) into a fresh private storage on the same disk."""
    d = Path(tempfile.mkdtemp(prefix="p", dir=base))
    conf = d / "storage.conf"
    conf.write_text(f'[storage]\ndriver = "overlay"\ngraphroot = "{d}/root"\nrunroot = "{d}/rr"\n')
    env = dict(os.environ, CONTAINERS_STORAGE_CONF=str(conf))
    try:
        subprocess.run(["sync"], check=True)
        t0 = time.monotonic()
        p = subprocess.run(["podman", "--events-backend", "none", "pull", "-q", "--tls-verify=false", ref], env=env,
                           capture_output=True, text=True)
        dt = time.monotonic() - t0
        if p.returncode:
            raise SystemExit(f"podman pull failed: {p.stderr.strip()[-300:]}")
        return dt, ""
    finally:
        subprocess.run(["podman", "--events-backend", "none", "rmi", "-a", "-f"], env=env, capture_output=True)
        subprocess.run(["umount", "-R", "-l", f"{d}/root/overlay"], capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


def timed_pull(ref: str, layout: str, base: Path) -> tuple[float, str]:
    if layout == "podman":
        return timed_podman_pull(ref, base)
    root = Path(tempfile.mkdtemp(prefix="pull-", dir=base))
    env = dict(os.environ, LAZYSHIM_ROOT=str(root), LAZYSHIM_STORE_LAYOUT=layout)
    try:
        subprocess.run(["sync"], check=True)
        t0 = time.monotonic()
        p = subprocess.run([LAZYSHIM, "pull", "-q", ref], env=env, capture_output=True, text=True)
        dt = time.monotonic() - t0
        if p.returncode:
            raise SystemExit(f"pull failed: {p.stderr.strip()}")
        mem = ""
        if layout == "v2":
            st = os.statvfs(root / "meta")
            mem = f"{(st.f_blocks - st.f_bfree) * st.f_frsize / 1e6:.1f} MB data, {st.f_files - st.f_ffree} inodes"
        return dt, mem
    finally:
        from shim import api

        api.release_store(root)
        shutil.rmtree(root, ignore_errors=True)


class DiskLoad:
    """`dd if=/dev/zero of=FILE bs=1M count=2000 oflag=direct` beside the pulls."""

    def __init__(self, base: Path) -> None:
        self.file = base / "dd.load"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> DiskLoad:
        self.proc = subprocess.Popen(["dd", "if=/dev/zero", f"of={self.file}", "bs=1M", "count=2000",
                                      "oflag=direct"], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not self.file.exists() or self.file.stat().st_size < 64 << 20):
            time.sleep(0.05)  # a benchmark, not a test: wait until the load is on
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.file.unlink(missing_ok=True)


def _slab_shmem_kib() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(fields["Slab"].split()[0]) + int(fields["Shmem"].split()[0])


def metadata_memory(ref: str, base: Path, runs: int) -> list[float]:
    """MiB freed by unmounting a v2 store's metadata tmpfs right after a pull."""
    out = []
    for _ in range(runs):
        root = Path(tempfile.mkdtemp(prefix="mem-", dir=base))
        env = dict(os.environ, LAZYSHIM_ROOT=str(root), LAZYSHIM_STORE_LAYOUT="v2")
        try:
            subprocess.run([LAZYSHIM, "pull", "-q", ref], env=env, check=True, capture_output=True)
            before = _slab_shmem_kib()
            subprocess.run(["umount", "-R", str(root / "meta")], check=True)
            time.sleep(1)  # a benchmark: let RCU free the inodes
            out.append((before - _slab_shmem_kib()) / 1024)
        finally:
            from shim import api

            api.release_store(root)
            shutil.rmtree(root, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory", action="store_true", help="measure the v2 metadata tmpfs's kernel memory only")
    a = ap.parse_args(argv)
    from integration.registry import Registry

    base = Path(tempfile.mkdtemp(prefix="lzpullbench-", dir=Path(__file__).resolve().parent.parent / ".cache"))
    try:
        with Registry() as reg:
            ref = synthetic_image(reg, a.entries)
            if a.memory:
                mib = metadata_memory(ref, base, a.runs)
                print(f"v2 metadata of {a.entries} entries: {statistics.median(mib):.1f} MiB "
                      f"(median of {a.runs}: {', '.join(f'{m:.1f}' for m in mib)})")
                return 0
            print(f"# lazyshim pull of {a.entries} entries (median of {a.runs}, min-max)")
            print("| layout | disk | pull | v2 metadata tmpfs |\n|---|---|---|---|")
            for load in (False, True):
                for layout in ("v1", "v2", "podman"):
                    times, mem = [], ""
                    for _ in range(a.runs):
                        if load:
                            with DiskLoad(base) as dd:
                                dt, mem = timed_pull(ref, layout, base)
                                if not dd.running():
                                    print(f"# note: dd ended before a {layout} pull did", file=sys.stderr)
                        else:
                            dt, mem = timed_pull(ref, layout, base)
                        times.append(dt)
                    name = layout if layout == "podman" else f"lazyshim {layout}"
                    print(f"| {name} | {'dd 2 GB beside' if load else 'idle'} | {statistics.median(times):.2f} s "
                          f"({min(times):.2f}-{max(times):.2f}) | {mem} |", flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
