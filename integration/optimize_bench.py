"""What an optimized image buys: plain eStargz vs one rewritten with the workload's files first.

    .venv/bin/python -m integration.optimize_bench [--image py] [--link 100mbit:20ms]

Records the workload's files with `lazyshim record`, rewrites the legacy image with
`lazyshim convert --prioritize`, then times `pull`+`run` (fresh store each) of the plain
eStargz image (on-demand fills only) and of the optimized one (its prioritized files
fetched at start in large range requests).  Not part of `make test`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from integration.bench import WORKLOADS, Bench
from integration.netem import Link

LAZYSHIM = str(Path(sys.executable).parent / "lazyshim")


def _check(argv: list[str], env: dict[str, str]) -> None:
    p = subprocess.run(argv, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(argv[-4:])}: {p.stderr.strip()[-400:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="py")
    ap.add_argument("--link", default="100mbit:20ms")
    ap.add_argument("--memory", action="store_true", help="stores on tmpfs (/dev/shm), see README")
    a = ap.parse_args(argv)
    from integration.bench_images import register_all

    register_all()
    wl = WORKLOADS[a.image]
    with Bench(Link.parse(a.link), [a.image], ["esgz"]) as b:
        ns = b.ns.prefix
        plain, legacy = b.refs[f"{a.image}:esgz"], b.refs[f"{a.image}:legacy"]
        optimized = legacy.rsplit(":", 1)[0] + ":lazyshim-opt"
        prio = Path(b.tmp) / "prioritize.txt"
        env = dict(os.environ)
        _check([*ns, LAZYSHIM, "record", "-o", str(prio), plain, *wl.cmd], env)
        _check([*ns, LAZYSHIM, "convert", "-q", legacy, optimized, "--prioritize", str(prio)], env)
        print(f"# {a.image} over {a.link} (RTT {b.rtt * 1000:.1f} ms): {len(prio.read_text().split())} files recorded")
        print("| image | background | first output | registry bytes |\n|---|---|---|---|")
        for ref, mode in ((plain, "none"), (optimized, "prioritized")):
            root = tempfile.mkdtemp(prefix="lzb-opt-", dir="/dev/shm" if a.memory else b.tmp)
            env = dict(os.environ, LAZYSHIM_ROOT=root, LAZYSHIM_BACKGROUND_FETCH=mode)
            b.registry.clear_access_log()
            t0 = time.monotonic()
            _check([*ns, LAZYSHIM, "pull", "-q", ref], env)
            p = subprocess.Popen([*ns, LAZYSHIM, "run", "--rm", ref, *wl.cmd], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL)
            assert p.stdout is not None
            p.stdout.read(1)
            t = time.monotonic() - t0
            p.communicate()
            print(f"| {ref.rsplit('/', 1)[1]} | {mode} | {t:.2f} s | {b.served() / 1e6:.1f} MB |", flush=True)
            subprocess.run(["rm", "-rf", root])
    return 0


if __name__ == "__main__":
    sys.exit(main())
