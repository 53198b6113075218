"""Time to first output of one image on every way users start it, over a shaped link.

    .venv/bin/python -m integration.paths_bench [--image py] [--link 100mbit:20ms]

Paths: standalone `lazyshim pull`+`run`; podman through lazyshim's additional layer store
with `--runtime lazyshim`; containerd's `ctr run --runc-binary lazyshim` on `lazyshim mount`;
rootless `lazyshim pull`+`run` as an ordinary user; rootless podman the same way.  Every
registry byte crosses the emulated link (integration.netem); each path starts from empty
stores.  Not part of `make test`.
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

from integration.bench import Bench
from integration.images import Containerd
from integration.netem import Link, in_netns
from integration.users import USER, ensure_user

LAZYSHIM = str(Path(sys.executable).parent / "lazyshim")
CMD = ["python3", "-c", "print('hello')"]
PODMAN_RUN = ["run", "--rm", "--network", "none", "--annotation", "run.lazyshim.background-fetch=none"]


def timed(steps: list[list[str]], env: dict[str, str]) -> float:
    """Run the steps (the last one's first output byte ends the clock); seconds."""
    t0 = time.monotonic()
    for argv in steps[:-1]:
        p = subprocess.run(argv, env=env, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{' '.join(argv[-3:])}: {p.stderr.strip()[-300:]}")
    p = subprocess.Popen(steps[-1], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout is not None and p.stderr is not None
    first = p.stdout.read(1)
    t = time.monotonic() - t0
    rest, err = p.communicate()
    if p.returncode or not first:
        raise SystemExit(f"{' '.join(steps[-1][-4:])}: rc={p.returncode} {err.decode()[-300:]}")
    return t


def user_home(tmp: Path) -> tuple[Path, list[str]]:
    pw = ensure_user()
    home = Path(tempfile.mkdtemp(prefix="lzr-"))
    conf = home / ".config/containers"
    conf.mkdir(parents=True)
    (home / "run").mkdir(mode=0o700)
    (conf / "containers.conf").write_text(
        '[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
    (conf / "storage.conf").write_text(f'[storage]\ndriver = "overlay"\n[storage.options]\n'
                                       f'additionallayerstores = ["{home}/.local/share/lazyshim/als:ref"]\n')
    for d, _, files in os.walk(home):
        shutil.chown(d, pw.pw_uid, pw.pw_gid)
        for f in files:
            shutil.chown(os.path.join(d, f), pw.pw_uid, pw.pw_gid)
    env = ["runuser", "-u", USER, "--", "env", "-i", f"HOME={home}", f"XDG_RUNTIME_DIR={home}/run",
           f"PATH={os.environ['PATH']}"]
    return home, env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image", default="py")
    ap.add_argument("--link", default="100mbit:20ms")
    a = ap.parse_args(argv)
    if a.image in ("py", "pysci", "gcc", "pg"):
        from integration.bench_images import register_all

        register_all()
    with Bench(Link.parse(a.link), [a.image], ["esgz"]) as b:
        ref, ns = b.refs[f"{a.image}:esgz"], b.ns.prefix
        print(f"# {ref} over {a.link}: RTT {b.rtt * 1000:.1f} ms, goodput {b.goodput * 8 / 1e6:.1f} Mbit/s")
        results: list[tuple[str, float, int]] = []

        def record(name: str, t: float) -> None:
            results.append((name, t, b.served()))
            print(f"{name}: {t:.2f} s, {results[-1][2] / 1e6:.1f} MB", flush=True)

        def fresh_store() -> dict[str, str]:
            return dict(os.environ, LAZYSHIM_ROOT=tempfile.mkdtemp(prefix="s", dir=b.tmp),
                        LAZYSHIM_BACKGROUND_FETCH="none")

        env = fresh_store()
        b.registry.clear_access_log()
        record("standalone", timed([[*ns, LAZYSHIM, "pull", "-q", ref],
                                    [*ns, LAZYSHIM, "run", "--rm", ref, *CMD]], env))

        env = fresh_store()
        top = Path(tempfile.mkdtemp(prefix="p", dir=b.tmp))
        (top / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{top}/root"\nrunroot = "{top}/rr"\n'
            f'[storage.options]\nadditionallayerstores = ["{env["LAZYSHIM_ROOT"]}/als:ref"]\n')
        env["CONTAINERS_STORAGE_CONF"] = str(top / "storage.conf")
        podman = ["podman", "--runtime", LAZYSHIM, "--cgroup-manager", "cgroupfs", "--events-backend", "none"]
        b.registry.clear_access_log()
        try:
            record("podman (layer store)", timed([
                [*ns, LAZYSHIM, "pull", "-q", ref], [*ns, *podman, "pull", "-q", "--tls-verify=false", ref],
                [*ns, *podman, *PODMAN_RUN, "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768",
                 ref, *CMD]], env))
        finally:
            subprocess.run([*podman, "rmi", "-af"], env=env, capture_output=True)
            subprocess.run(["umount", "-R", "-l", f"{top}/root/overlay"], capture_output=True)

        env = fresh_store()
        ctrd = Containerd(Path(tempfile.mkdtemp(prefix="c", dir=b.tmp)))
        in_netns(b.ns.path, ctrd.start)  # its shims, and so our supervisor, must reach the registry
        rootfs = Path(b.tmp) / "ctr-rootfs"
        b.registry.clear_access_log()
        try:
            record("containerd (ctr --runc-binary)", timed([
                [*ns, LAZYSHIM, "mount", ref, str(rootfs)],
                [*ns, "ctr", "--address", str(ctrd.sock), "-n", "paths", "run", "--rm", "--runc-binary", LAZYSHIM,
                 "--annotation", "run.lazyshim.background-fetch=none", "--env", "PATH=/usr/bin:/bin",
                 "--rootfs", str(rootfs), "c1", *CMD]], env))
        finally:
            subprocess.run([LAZYSHIM, "umount", str(rootfs)], env=env, capture_output=True)
            ctrd.stop()

        home, as_user = user_home(Path(b.tmp))
        try:
            b.registry.clear_access_log()
            record("rootless", timed([[*ns, *as_user, "LAZYSHIM_BACKGROUND_FETCH=none", LAZYSHIM, "pull", "-q", ref],
                                      [*ns, *as_user, "LAZYSHIM_BACKGROUND_FETCH=none", LAZYSHIM, "run", "--rm",
                                       ref, *CMD]], dict(os.environ)))
            b.registry.clear_access_log()
            shutil.rmtree(home / ".local/share/lazyshim", ignore_errors=True)
            record("rootless podman", timed([
                [*ns, *as_user, LAZYSHIM, "pull", "-q", ref],
                [*ns, *as_user, "podman", "pull", "-q", "--tls-verify=false", ref],
                [*ns, *as_user, "podman", "--runtime", LAZYSHIM, *PODMAN_RUN, ref, *CMD]], dict(os.environ)))
        finally:
            subprocess.run(["pkill", "-u", USER], capture_output=True)
            shutil.rmtree(home, ignore_errors=True)
        print("\n| path | first output | registry bytes |\n|---|---|---|")
        for name, t, n in results:
            print(f"| {name} | {t:.2f} s | {n / 1e6:.1f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
