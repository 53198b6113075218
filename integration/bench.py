"""Benchmark: how soon a container prints and exits when its image is still in the registry.

``python -m integration.bench --image py --link 100mbit:20ms --runs 3 [--variants ...] [--json F]``

Everything runs inside a private network namespace whose loopback is shaped (integration.netem):
the registry, podman and lazyshim, so every registry byte crosses the emulated link. Per image and
variant, and per run with fresh caches, it records time to first output (TTFO), time to exit and
the bytes the registry served (its access log). Variants:

- ``podman``         podman pull + run of the legacy gzip image (private --root/--runroot);
- ``podman-zstd``    the same with podman's own zstd:chunked image and partial pulls enabled;
- ``lazyshim``       ``lazyshim pull`` + ``lazyshim run --rm`` of the ctr-remote eStargz image;
- ``lazyshim-zstd``  the same on podman's zstd:chunked image;
- ``lazyshim-nobg``  ``lazyshim`` with ``run --no-background-fetch``: the bytes the workload itself needs;
- ``lazyshim-mem``   ``lazyshim`` with its store on tmpfs (/dev/shm): no ext4 inode creation in the pull;
- ``lazyshim-prof``  ``lazyshim`` on a fresh store that holds only the start-up profile an earlier run of the
                     workload learned (one untimed run in a scratch store, then ``profile export``/``import``):
                     the second cold start of an image on a node, or on another node given the profile;
- ``lazyshim-warm``  ``lazyshim run --rm`` alone, of an image pulled and fetched in full beforehand (untimed):
                     the warm run, which the floor then includes;
- ``stargz``         the peer: podman pull + run of the eStargz image with stargz-snapshotter's
                     ``stargz-store`` as podman's additional layer store (FUSE; integration.peers,
                     built by ``make peers``);
- ``stargz-opt``     the same on the ``ctr-remote image optimize`` image (the workload's files first);
- ``lazyshim-opt``   ``lazyshim`` on that optimized image;
- ``floor``          (computed) bytes the workload needs (``lazyshim-nobg`` if run, else ``lazyshim``)
                     / link rate + 3 RTT (+ the warm run, if ``lazyshim-warm`` was measured).

Before anything is timed, lazyshim's modules are compiled to bytecode once (``precompile``), as
an installed package's are. Each sample also records ``pull``: the time the pull step took
(``podman pull`` / ``lazyshim pull``), so ``exit - pull`` is the time of the ``run`` step.

``--micro`` adds steady-state numbers: per-open cost after fill vs plain runc (supervised under
each trap backend, notify and ptrace, and once fully filled), ``state`` latency, the
supervisor's RSS, and (``notify_costs``, also on its own: ``python -c "from integration.bench
import notify_costs; print(notify_costs())"``) the same open on the host natively, under a filter
answered at once, and answered by the supervisor's notify loop.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from integration import images
from integration.netem import Link, NetemError, ShapedNetns, in_netns
from integration.peers import PeerError, podman_storage_conf, stargz_podman
from integration.registry import Registry, RegistryError

REPO = Path(__file__).resolve().parent.parent
LAZYSHIM = [sys.executable, "-m", "runtime.main"]


class BenchError(RuntimeError):
    """A benchmark step failed; the message is one line with the command and its stderr tail."""


@dataclass(frozen=True)
class Workload:
    image: str
    cmd: list[str]
    expect: str
    user: str = ""


PG = "/usr/lib/postgresql/15/bin"
WORKLOADS: dict[str, Workload] = {
    "busybox": Workload("busybox", ["/app/hello.sh"], "hello"),
    "python": Workload("python", ["python3", "-c", "print('hello')"], "hello"),
    "py": Workload("py", ["python3", "-c", "print('hello')"], "hello"),
    "pysci": Workload("pysci", ["python3", "-c", "import pandas, scipy; print('imported', pandas.__version__)"],
                      "imported"),
    "gcc": Workload("gcc", ["sh", "-c", "printf '#include <stdio.h>\\nint main(void){puts(\"hello\");return 0;}\\n'"
                            " > /tmp/h.c && gcc -o /tmp/h /tmp/h.c && /tmp/h"], "hello"),
    "pg": Workload("pg", ["sh", "-c",
                          f"{PG}/initdb -D /tmp/pg >/dev/null && {PG}/pg_ctl -D /tmp/pg -s -w "
                          "-o '-k /tmp -c listen_addresses=' start >/dev/null && "
                          "psql -h /tmp -d postgres -Atc 'select 40+2' && "
                          f"{PG}/pg_ctl -D /tmp/pg -s -m fast -w stop"], "42", user="postgres"),
    # `make demo`'s image (integration.demo_image): a model server's start-up check.
    "demo": Workload("demo", ["/app/serve.py", "--check"], "ready"),
    # integration.weights_image: numpy maps a 256 MiB weights file and samples 8 of its 64 chunks.
    "weights": Workload("weights", ["/app/sample.py"], "sha256"),
}
BIG = ("py", "pysci", "gcc", "pg")

# variant -> image variant (tag) it runs
VARIANTS: dict[str, str] = {
    "podman": "legacy",
    "podman-zstd": "podman-zstdchunked",
    "lazyshim": "esgz",
    "lazyshim-zstd": "podman-zstdchunked",
    "lazyshim-nobg": "esgz",
    "lazyshim-mem": "esgz",
    "lazyshim-prof": "esgz",
    "lazyshim-warm": "esgz",
    "stargz": "esgz",
    "stargz-opt": "esgz-opt",
    "lazyshim-opt": "esgz-opt",
}
DEFAULT_VARIANTS = ("podman", "podman-zstd", "lazyshim")


@dataclass
class Sample:
    ttfo: float
    exit: float
    bytes: int
    rc: int
    ok: bool
    pull: float = float("nan")  # seconds the pull step took (the rest of `exit` is the run step)
    ranges: int = 0  # range requests (206 answers) the registry served, pull and run


@dataclass
class Result:
    image: str
    variant: str
    samples: list[Sample] = field(default_factory=list)
    error: str = ""

    def med(self, attr: str) -> float:
        vals = [getattr(s, attr) for s in self.samples]
        return statistics.median(vals) if vals else float("nan")


# ---------------------------------------------------------------------------------------------
# Running one thing, timed
# ---------------------------------------------------------------------------------------------


def _check(argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 900) -> str:
    p = subprocess.run(list(argv), capture_output=True, text=True, env=env, timeout=timeout,
                       stdin=subprocess.DEVNULL, cwd=REPO)
    if p.returncode != 0:
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
        raise BenchError(f"`{' '.join(argv)}` failed ({p.returncode}): {tail}")
    return p.stdout


def timed(steps: Sequence[Sequence[str]], final: Sequence[str], env: dict[str, str],
          timeout: float = 900) -> tuple[float, float, str, str, int, float]:
    """Run ``steps`` (checked), then ``final``; return (ttfo, exit, stdout, stderr, rc, steps_time).

    Times are from t0; ``steps_time`` is when the steps (the pull) finished.
    """
    t0 = time.monotonic()
    for s in steps:
        _check(s, env, timeout)
    steps_time = time.monotonic() - t0
    from shim.trace import mark

    mark("bench", "run spawn")
    with tempfile.TemporaryFile() as errf:
        p = subprocess.Popen(list(final), stdout=subprocess.PIPE, stderr=errf, stdin=subprocess.DEVNULL,
                             env=env, cwd=REPO)
        assert p.stdout is not None
        first = p.stdout.read1(65536) if hasattr(p.stdout, "read1") else p.stdout.read(1)
        ttfo = time.monotonic() - t0
        rest = p.stdout.read()
        rc = p.wait(timeout=timeout)
        total = time.monotonic() - t0
        mark("bench", "run exit")
        errf.seek(0)
        err = errf.read().decode(errors="replace")
    return ttfo, total, (first + rest).decode(errors="replace"), err, rc, steps_time


class Bench:
    """One shaped namespace, one registry in it, the images pushed; runs variants."""

    def __init__(self, link: Link, names: Sequence[str], tags: Sequence[str],
                 workloads: dict[str, Workload] | None = None) -> None:
        """``workloads`` (by image name) are what ``esgz-opt`` images are optimized for."""
        self.link = link
        self.names = list(names)
        self.tags = sorted(set(tags) | {"legacy"})
        self.optimize = {n: images.OptimizeRun(tuple(w.cmd), w.user) for n, w in (workloads or {}).items()}
        self.stack = contextlib.ExitStack()
        self.tmp = Path(tempfile.mkdtemp(prefix="lzb-"))  # short: podman's runroot must be < 50 chars
        self.stack.callback(shutil.rmtree, self.tmp, ignore_errors=True)
        self.rtt = self.goodput = float("nan")
        self.built = images.BuildStats()

    def __enter__(self) -> Bench:
        try:
            self.ns = self.stack.enter_context(ShapedNetns(self.link))
            self.registry = self.stack.enter_context(
                Registry(prefix_cmd=self.ns.prefix, call_in=lambda f: in_netns(self.ns.path, f)))
            # Pushed before shaping: uploading is not what is measured.
            # podman 4.3's zstd:chunked push fails on some layers ("short write"): that variant
            # is then reported as failed, the others still run.
            self.built = images.BuildStats()
            self.refs = images.build_and_push(self.registry, self.names, self.tags, optimize=self.optimize,
                                              stats=self.built, may_fail=frozenset({"podman-zstdchunked"}))
            self.ns.shape()
            self.rtt, self.goodput = self.ns.verify()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        from integration.storeview import release_store_mounts_below

        release_store_mounts_below(self.tmp)  # v2 stores' metadata tmpfs, before their dirs go
        self.stack.close()

    def served(self) -> tuple[int, int]:
        """Body bytes the registry sent since the last clear, and how many range requests (206)
        it answered (waits for the log to settle)."""
        last, ranges, stable_since = -1, 0, time.monotonic()
        while time.monotonic() - stable_since < 0.3:
            log = [e for e in self.registry.access_log() if e.method == "GET"]
            n = sum(e.size for e in log)
            if n != last:
                last, stable_since = n, time.monotonic()
                ranges = sum(1 for e in log if e.status == 206)
            time.sleep(0.05)
        return last, ranges

    # -- variants ---------------------------------------------------------------------------------

    def run_variant(self, variant: str, wl: Workload, tag_variant: str) -> Sample:
        key = f"{wl.image}:{tag_variant}"
        if key not in self.refs:
            raise BenchError(f"image {key} could not be built: {self.built.failed.get(key, 'not built')}")
        ref = self.refs[key]
        self.registry.clear_access_log()
        if variant.startswith(("podman", "stargz")):
            with self._podman(partial=variant == "podman-zstd", stargz=variant.startswith("stargz")) as (base, env):
                user = ["--user", wl.user] if wl.user else []
                ttfo, total, out, err, rc, pull = timed(
                    [[*self.ns.prefix, *base, "pull", "--quiet", "--tls-verify=false", ref]],
                    [*self.ns.prefix, *base, "run", "--rm", "--network", "none", "--ulimit", "nofile=20000:20000",
                     "--ulimit", "nproc=32768:32768", *user, ref, *wl.cmd], env)
        else:
            profile = self._profile(wl, ref) if variant == "lazyshim-prof" else None
            with self._lazyshim_root(memory=variant == "lazyshim-mem") as env:
                user = ["--user", wl.user] if wl.user else []
                nobg = ["--no-background-fetch"] if variant == "lazyshim-nobg" else []
                steps = [[*self.ns.prefix, *LAZYSHIM, "pull", "--quiet", ref]]
                if profile is not None:  # setup, untimed: the store knows nothing but the profile
                    _check([*LAZYSHIM, "profile", "import", str(profile)], env)
                if variant == "lazyshim-warm":  # setup, untimed: the image in full; only the run is timed
                    _check([*self.ns.prefix, *LAZYSHIM, "pull", "--quiet", ref], env)
                    _check([*self.ns.prefix, *LAZYSHIM, "fetch", "--quiet", ref], env)
                    steps = []
                self.registry.clear_access_log()
                ttfo, total, out, err, rc, pull = timed(
                    steps, [*self.ns.prefix, *LAZYSHIM, "run", "--rm", *nobg, *user, ref, *wl.cmd], env)
        ok = rc == 0 and wl.expect in out
        if not ok:
            tail = " | ".join(err.strip().splitlines()[-3:])
            raise BenchError(f"{variant} {ref} {wl.cmd}: rc={rc} stdout={out[-200:]!r} stderr: {tail}")
        served, ranges = self.served()
        if variant.startswith("stargz"):
            self._check_layer_store_used(variant, wl.image, tag_variant)
        return Sample(ttfo, total, served, rc, ok, pull, ranges)

    def _profile(self, wl: Workload, ref: str) -> Path:
        """The start-up profile of `wl` on `ref`, learned once per bench by an untimed run in a
        scratch store and exported to a file (what `lazyshim profile import` takes)."""
        path = self.tmp / f"profile-{wl.image}.json"
        if not path.exists():
            with self._lazyshim_root() as env:
                user = ["--user", wl.user] if wl.user else []
                _check([*self.ns.prefix, *LAZYSHIM, "pull", "--quiet", ref], env)
                _check([*self.ns.prefix, *LAZYSHIM, "run", "--rm", *user, ref, *wl.cmd], env)
                _check([*LAZYSHIM, "profile", "export", "-o", str(path), ref], env)
        return path

    def _check_layer_store_used(self, variant: str, image: str, tag: str) -> None:
        """podman falls back to a full pull, silently, when the layer store cannot serve a layer:
        then a layer blob was sent whole (stargz-store itself reads ranges only)."""
        sizes = set(images.cached_layer_sizes(image, tag, self.optimize.get(image)))
        whole = [e for e in self.registry.access_log()
                 if e.method == "GET" and e.status == 200 and e.blob_digest and e.size in sizes]
        if whole:
            raise BenchError(f"{variant}: podman downloaded {len(whole)} whole layer(s) itself, "
                             "so stargz-store did not serve them")

    @contextlib.contextmanager
    def _lazyshim_root(self, memory: bool = False) -> Iterator[dict[str, str]]:
        root = Path(tempfile.mkdtemp(prefix="lzb-store-", dir="/dev/shm" if memory else self.tmp))
        try:
            yield dict(os.environ, LAZYSHIM_ROOT=str(root))
        finally:
            from shim import api

            api.release_store(root)
            subprocess.run(["umount", "-R", "-l", str(root)], capture_output=True)
            shutil.rmtree(root, ignore_errors=True)

    @contextlib.contextmanager
    def _podman(self, partial: bool, stargz: bool = False) -> Iterator[tuple[list[str], dict[str, str]]]:
        """A private podman store (fresh each run); with ``stargz`` a fresh stargz-store as its layer store."""
        from runtime.delegate import find_delegate  # runc here: crun refuses hybrid cgroups

        d = Path(tempfile.mkdtemp(prefix="p", dir=self.tmp))
        try:
            with contextlib.ExitStack() as stack:
                if stargz:
                    try:
                        conf = stack.enter_context(stargz_podman(d, self.registry.host, self.ns.prefix))
                    except PeerError as exc:
                        raise BenchError(str(exc)) from None
                else:
                    conf = d / "storage.conf"
                    conf.write_text(podman_storage_conf(d / "root", d / "rr", partial=partial))
                # Roots and driver come from storage.conf only: podman ignores the conf's [storage.options]
                # (partial pulls, the layer store) when --root/--runroot/--storage-driver are given.
                base = ["podman", "--runtime", find_delegate(),
                        "--cgroup-manager", "cgroupfs", "--events-backend", "none", "--tmpdir", f"{d}/tmp"]
                env = dict(os.environ, CONTAINERS_STORAGE_CONF=str(conf))
                try:
                    yield base, env
                finally:
                    subprocess.run([*base, "rmi", "--all", "--force"], capture_output=True, env=env)
                    subprocess.run(["umount", "-R", "-l", f"{d}/root/overlay"], capture_output=True)
        finally:  # the layer store is unmounted by now: nothing below d reaches the registry
            shutil.rmtree(d, ignore_errors=True)

    def floor(self, lazy_bytes: float, warm: float = 0.0) -> float:
        """Needed bytes / rate + 3 RTT (+ the warm run, when it was measured)."""
        return lazy_bytes / self.link.bytes_per_s + 3 * self.link.rtt_s + (warm if warm == warm else 0.0)


# ---------------------------------------------------------------------------------------------
# Micro-benchmarks
# ---------------------------------------------------------------------------------------------

OPEN_LOOP = ("import time\nf='/usr/lib/python3.11/os.py'\nopen(f).close()\nt=time.perf_counter()\n"
             "for _ in range(100000): open(f).close()\nprint('%.0f' % ((time.perf_counter()-t)/100000*1e9))\n")


def micro(b: Bench, image: str) -> dict[str, float | str]:
    """Per-open cost after fill (lazyshim supervised, lazyshim fully filled, runc), `state` latency, RSS."""
    from integration.bundle import bundle_from_registry

    out: dict[str, float | str] = {}
    ref_lazy, ref_legacy = b.refs[f"{image}:esgz"], b.refs[f"{image}:legacy"]
    # Plain runc on the unpacked legacy image: the baseline.
    bdir = b.tmp / "bundle"
    bundle = in_netns(b.ns.path, lambda: None) or None  # noqa: F841 (namespace sanity)
    _check([*b.ns.prefix, sys.executable, "-c",
            f"from integration.bundle import bundle_from_registry as f; f({ref_legacy!r}, __import__('pathlib')"
            f".Path({str(bdir)!r}))"])
    del bundle_from_registry
    bundle = bdir / "bundle"
    cfg = json.loads((bundle / "config.json").read_text())
    state = b.tmp / "runc-state"
    state.mkdir(exist_ok=True)

    def runc_run(args: list[str], cid: str, detach: bool = False) -> str:
        cfg["process"]["args"] = args
        cfg["process"]["env"] = ["PATH=/usr/local/bin:/usr/bin:/bin"]
        cfg["process"]["terminal"] = False
        (bundle / "config.json").write_text(json.dumps(cfg))
        return _check(["runc", "--root", str(state), "run", *(["-d"] if detach else []), "--bundle", str(bundle),
                       cid])

    runc_ns = [int(runc_run(["python3", "-c", OPEN_LOOP], f"lzb-open-{i}").strip()) for i in range(3)]
    out["open_ns_runc"] = statistics.median(runc_ns)
    from runtime.paths import runtime_dir

    with b._lazyshim_root() as env:
        _check([*b.ns.prefix, *LAZYSHIM, "pull", "--quiet", ref_lazy], env)
        # Without background fetch the image stays partly filled, so the supervisor stays attached
        # (a fully filled image runs natively, without one): this is the supervised per-open cost.
        lazy_ns = [int(_check([*b.ns.prefix, *LAZYSHIM, "run", "--rm", "--no-background-fetch", ref_lazy,
                               "python3", "-c", OPEN_LOOP], env).strip()) for _ in range(3)]
        out["open_ns_lazyshim"] = statistics.median(lazy_ns)
        out["open_ratio"] = out["open_ns_lazyshim"] / out["open_ns_runc"]
        # The same under the ptrace trap backend (SECCOMP_RET_TRACE, the supervisor as tracer).
        traced = dict(env, LAZYSHIM_TRAP="ptrace")
        ptrace_ns = [int(_check([*b.ns.prefix, *LAZYSHIM, "run", "--rm", "--no-background-fetch", ref_lazy,
                                 "python3", "-c", OPEN_LOOP], traced).strip()) for _ in range(3)]
        out["open_ns_lazyshim_ptrace"] = statistics.median(ptrace_ns)
        out["open_ratio_ptrace"] = out["open_ns_lazyshim_ptrace"] / out["open_ns_runc"]

        # Supervisor RSS while a container runs (after python has started, i.e. after its fills).
        cid = f"lzbrss{os.getpid()}"
        p = subprocess.Popen([*b.ns.prefix, *LAZYSHIM, "run", "--rm", "--no-background-fetch", "--name", cid,
                              ref_lazy, "python3", "-c",
                              "import json, sys; print('up', flush=True); import time; time.sleep(2)"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        assert p.stdout is not None
        p.stdout.readline()
        rss = "n/a"
        with contextlib.suppress(OSError, ValueError):
            pid = int((Path(runtime_dir()) / cid / "supervisor.pid").read_text())
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss = float(line.split()[1]) / 1024
        p.communicate(timeout=60)
        out["supervisor_rss_mib"] = rss

        # After every file is filled (`lazyshim fetch`) the container runs natively: steady state.
        _check([*b.ns.prefix, *LAZYSHIM, "fetch", ref_lazy], env)
        filled_ns = [int(_check([*b.ns.prefix, *LAZYSHIM, "run", "--rm", ref_lazy, "python3", "-c", OPEN_LOOP],
                                env).strip()) for _ in range(3)]
        out["open_ns_lazyshim_filled"] = statistics.median(filled_ns)
        out["open_ratio_filled"] = out["open_ns_lazyshim_filled"] / out["open_ns_runc"]

    # `state`: runc vs lazyshim on a running runc container.
    cid = f"lzb-state-{os.getpid()}"
    runc_run(["python3", "-c", "import time; time.sleep(30)"], cid, detach=True)  # the python image has no sleep
    try:
        out["state_ms_runc"] = _loop_ms(["runc", "--root", str(state), "state", cid])
        probe = subprocess.run([*LAZYSHIM, "--root", str(state), "state", cid], capture_output=True, text=True,
                               cwd=REPO)
        if probe.returncode == 0:
            out["state_ms_lazyshim"] = _loop_ms([*LAZYSHIM, "--root", str(state), "state", cid])
        else:
            out["state_ms_lazyshim"] = "n/a: " + (probe.stderr.strip().splitlines() or ["?"])[-1][:100]
        out["version_ms_lazyshim"] = _loop_ms([*LAZYSHIM, "--version"])
    finally:
        subprocess.run(["runc", "--root", str(state), "delete", "--force", cid], capture_output=True)
    out.update(notify_costs())
    return out


NOTIFY_TARGET = """
import ctypes, os, socket, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
if sys.argv[2] != "native":  # trap openat, as lazyshim's filter does, and hand the listener over
    lib = ctypes.CDLL("libseccomp.so.2")
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.c_void_p]
    lib.seccomp_load.argtypes = lib.seccomp_notify_fd.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(0x7FFF0000)  # SCMP_ACT_ALLOW
    if lib.seccomp_rule_add_array(ctx, 0x7FC00000, 257, 0, None) or lib.seccomp_load(ctx):  # NOTIFY openat
        sys.exit("seccomp filter refused")
    socket.send_fds(sock, [b"x"], [lib.seccomp_notify_fd(ctx)])
sock.recv(1)
f = "/usr/lib/python3.11/os.py"
open(f).close()
t = time.perf_counter()
for _ in range(100000):
    open(f).close()
sock.sendall(b"%.0f" % ((time.perf_counter() - t) / 100000 * 1e9))
"""


def notify_costs(runs: int = 3) -> dict[str, float]:
    """Where a supervised open's time goes, without a container: the micro loop's open on the
    host, natively (`open_ns_host`); under a NOTIFY filter whose listener answers CONTINUE at
    once (`open_ns_notify_floor`: the kernel's round trip and a Python receive/answer, the floor
    of any per-open supervision here); and answered by the supervisor's own NotifyLoop, decide
    and task view, with an image that has no unfilled file (`open_ns_notify_decide`).  The
    `cpu_us_notify_*` figures are the listener thread's own CPU time per notification: what
    our code costs, far steadier on a shared machine than the wall times."""
    import select
    import socket
    import threading

    from seccomp.notify import Notifier
    from seccomp.verdict import Verdicts
    from shim.supervisor.notify_loop import NotifyLoop

    class Filled:  # the image view: nothing left to fill
        complete = False

        def lookup(self, st):
            return None

        def exec_chain_filled(self, key) -> bool:
            return True

    def floor(notifier: Notifier, count: Count) -> None:  # NotifyLoop.run without a decision
        poller = select.poll()
        poller.register(notifier.fd, select.POLLIN)
        waits = getattr(notifier, "recv_waits", False)
        try:
            while waits or poller.poll()[0][1] & select.POLLIN:
                n = notifier.recv()
                if n is not None:
                    count.notifications += 1
                    notifier.allow(n.id)
                elif waits and (ev := poller.poll(0)) and not ev[0][1] & select.POLLIN:
                    return  # no target left
        finally:
            notifier.close()

    class Count:
        notifications = 0

    def timed_thread(run, count: Count, cpu: list[float]):
        def body() -> None:
            t0 = time.thread_time()
            try:
                run()
            finally:
                cpu.append((time.thread_time() - t0) / max(count.notifications, 1))
        return body

    def one(mode: str) -> tuple[float, float]:
        count, cpu = Count(), []
        ours, theirs = socket.socketpair()
        with ours, theirs:
            p = subprocess.Popen([sys.executable, "-c", NOTIFY_TARGET, str(theirs.fileno()), mode],
                                 pass_fds=[theirs.fileno()])
            theirs.close()
            if mode != "native":
                _, fds, _, _ = socket.recv_fds(ours, 1, 1)
                if not fds:
                    p.wait()
                    raise BenchError("the notify target sent no listener fd")
                notifier = Notifier(fds[0])
                run = (lambda: floor(notifier, count)) if mode == "floor" else NotifyLoop(
                    notifier, Verdicts.allow_all(), Filled(), lambda *a: None, lambda msg: None, counter=count).run
                listener = threading.Thread(target=timed_thread(run, count, cpu), daemon=True)
                listener.start()
            ours.sendall(b"g")
            ns = ours.recv(64)
        if p.wait(timeout=300) != 0 or not ns:
            raise BenchError(f"the notify target ({mode}) failed")
        if mode != "native":
            listener.join(60)
        return float(ns), (cpu[0] * 1e6 if cpu else float("nan"))

    out = {}
    for mode in ("native", "floor", "decide"):
        samples = [one(mode) for _ in range(runs)]
        out[f"open_ns_{'host' if mode == 'native' else 'notify_' + mode}"] = statistics.median(s[0] for s in samples)
        if mode != "native":
            out[f"cpu_us_notify_{mode}"] = statistics.median(s[1] for s in samples)
    return out


def _loop_ms(argv: list[str], n: int = 20) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, capture_output=True, cwd=REPO)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def needed(results: list[Result], image: str) -> Result | None:
    """The run whose bytes are the workload's need: lazyshim without background fetch if measured."""
    for v in ("lazyshim-nobg", "lazyshim"):
        r = next((r for r in results if r.image == image and r.variant == v and r.samples), None)
        if r:
            return r
    return None


def warm_run(results: list[Result], image: str) -> float:
    """The median warm run (``lazyshim-warm``) of `image`, or 0 when it was not measured."""
    r = next((r for r in results if r.image == image and r.variant == "lazyshim-warm" and r.samples), None)
    return r.med("exit") if r else 0.0


def _spread(r: Result, attr: str) -> str:
    vals = [getattr(s, attr) for s in r.samples]
    return f" ({min(vals):.1f}–{max(vals):.1f})" if len(vals) > 1 else ""


def _speedup(base: float, t: float) -> str:
    """How many times faster than podman, or – when podman was not run (NaN-safe)."""
    return f"{base / t:.1f}×" if base == base and t == t and t > 0 else "–"


def _ratio(num: float, den: float) -> str:
    return f"{num / den:.2f}" if den == den and num == num and den > 0 else "–"  # NaN-safe


def table(results: list[Result], b: Bench) -> str:
    """Markdown: per image and variant the medians, speed-up over podman, and time ratios to the floor
    and to the peer (``stargz`` on plain eStargz; ``stargz-opt`` for the ``-opt`` variants)."""
    lines = [f"link {b.link} (measured RTT {b.rtt * 1000:.1f} ms, goodput {b.goodput * 8 / 1e6:.1f} Mbit/s); "
             f"median of {max((len(r.samples) for r in results), default=0)} runs, fresh caches each run; "
             "÷ floor, ÷ stargz: time to exit divided by theirs (< 1 is faster)",
             "", "| image | variant | first output | exit (min–max) | pull step + run step | registry bytes "
             "| vs podman | ÷ floor | ÷ stargz | run step ÷ stargz's |", "|---|---|---|---|---|---|---|---|---|---|"]
    by_image: dict[str, list[Result]] = {}
    for r in results:
        by_image.setdefault(r.image, []).append(r)
    for image, rs in by_image.items():
        exits = {r.variant: r.med("exit") for r in rs if r.samples}
        runs = {r.variant: statistics.median([s.exit - s.pull for s in r.samples]) for r in rs if r.samples}
        nan = float("nan")
        base = exits.get("podman", nan)
        lazy = needed(rs, image)
        fl = b.floor(lazy.med("bytes"), warm_run(rs, image)) if lazy else float("nan")
        for r in rs:
            if r.error:
                err = r.error.replace("|", "/")  # the tail says why; the full command is in the JSON
                lines.append(f"| {image} | {r.variant} | failed: …{err[-160:]} | | | | | | | |")
                continue
            if not r.samples:  # --runs 0: only the micro-benchmarks were asked for
                continue
            peer_name = "stargz-opt" if r.variant.endswith("-opt") else "stargz"
            peer = exits.get(peer_name, nan)
            speed = _speedup(base, r.med("exit"))
            pull = r.med("pull")
            run = statistics.median([s.exit - s.pull for s in r.samples])
            lines.append(f"| {image} | {r.variant} | {r.med('ttfo'):.2f} s | {r.med('exit'):.2f} s"
                         f"{_spread(r, 'exit')} | {pull:.2f} + {run:.2f} s | {_mb(r.med('bytes'))} "
                         f"({r.med('ranges'):.0f} ranges) | {speed} "
                         f"| {_ratio(r.med('exit'), fl)} | {_ratio(r.med('exit'), peer)} "
                         f"| {_ratio(run, runs.get(peer_name, nan))} |")
        if lazy:
            lines.append(f"| {image} | floor | {fl:.2f} s | | | {_mb(lazy.med('bytes'))} ({lazy.variant}) | "
                         f"{_speedup(base, fl)} | 1.00 | {_ratio(fl, exits.get('stargz', nan))} | |")
    return "\n".join(lines)


def chart(results: list[Result], b: Bench, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no chart: matplotlib missing (make bench installs requirements-bench.lock)"
    groups = sorted({r.image for r in results}, key=[r.image for r in results].index)
    variants = sorted({r.variant for r in results}, key=[r.variant for r in results].index) + ["floor"]
    fig, ax = plt.subplots(figsize=(2 + 2.2 * len(groups), 4))
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        xs, ys = [], []
        for i, g in enumerate(groups):
            if v == "floor":
                lazy = needed(results, g)
                y = b.floor(lazy.med("bytes"), warm_run(results, g)) if lazy else None
            else:
                r = next((r for r in results if r.image == g and r.variant == v and r.samples), None)
                y = r.med("exit") if r else None
            if y is not None:
                xs.append(i + (j - (len(variants) - 1) / 2) * width)
                ys.append(y)
        bars = ax.bar(xs, ys, width, label=v)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("seconds to exit (median)")
    ax.set_title(f"pull + run, link {b.link}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"chart: {path}"


def precompile() -> None:
    """Compile lazyshim's modules once before anything is timed: an installed package ships
    its bytecode, but a shell with PYTHONDONTWRITEBYTECODE=1 (which every timed command
    inherits) never writes it, and each lazyshim command would recompile every module it
    imports (+0.1-0.2 s per command)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", "shim", "runtime", "seccomp"], cwd=REPO,
                   env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
                   check=True, capture_output=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m integration.bench", description=__doc__.split("\n")[0])
    p.add_argument("--image", default="python",
                   help=f"comma list of {', '.join(WORKLOADS)}; 'big' = {','.join(BIG)}")
    p.add_argument("--link", default="100mbit:20ms")
    p.add_argument("--runs", type=int, default=3, help="runs per image and variant (0: only --micro)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--json", type=Path)
    p.add_argument("--png", type=Path)
    p.add_argument("--micro", action="store_true", help="also per-open, state and RSS micro-benchmarks")
    args = p.parse_args(argv)
    names = [n for x in args.image.split(",") for n in (BIG if x == "big" else (x,))]
    variants = args.variants.split(",")
    try:
        bad = [n for n in names if n not in WORKLOADS] + [v for v in variants if v not in VARIANTS]
        if bad:
            raise BenchError(f"unknown image/variant: {', '.join(bad)}")
        if any(n in BIG for n in names):
            from integration.bench_images import register_all

            register_all()
        if "demo" in names:
            from integration import demo_image

            demo_image.register()
        if "weights" in names:
            from integration import weights_image

            weights_image.register()
        link = Link.parse(args.link)
        precompile()
        tags = {VARIANTS[v] for v in variants} | ({"esgz"} if args.micro else set())
        print(f"# preparing images {names} {sorted(tags)} and link {link} ...", file=sys.stderr, flush=True)
        with Bench(link, names, tags, {n: WORKLOADS[n] for n in names}) as b:
            print(f"# link: RTT {b.rtt * 1000:.1f} ms, goodput {b.goodput * 8 / 1e6:.1f} Mbit/s", file=sys.stderr)
            results = []
            for name in names:
                wl = WORKLOADS[name]
                for v in variants:
                    r = Result(name, v)
                    results.append(r)
                    for i in range(args.runs):
                        try:
                            s = b.run_variant(v, wl, VARIANTS[v])
                        except (BenchError, subprocess.TimeoutExpired) as exc:
                            r.error = str(exc)
                            print(f"# {name} {v} run {i + 1}: FAILED {exc}", file=sys.stderr, flush=True)
                            break
                        r.samples.append(s)
                        print(f"# {name} {v} run {i + 1}: first output {s.ttfo:.2f} s, exit {s.exit:.2f} s, "
                              f"pull {s.pull:.2f} s + run {s.exit - s.pull:.2f} s, {_mb(s.bytes)}, "
                              f"{s.ranges} range requests", file=sys.stderr, flush=True)
            micro_res = micro(b, names[0] if names[0] in ("python", "py") else "python") if args.micro else {}
            if not b.ns.delayer_alive():
                raise BenchError("the link's delayer died during the run: results are not shaped")
            md = table(results, b)
            print(md)
            if micro_res:
                print("\nmicro:", json.dumps(micro_res))
            if args.png:
                print(chart(results, b, args.png), file=sys.stderr)
            if args.json:
                args.json.write_text(json.dumps({
                    "link": str(link), "rtt_s": b.rtt, "goodput_Bps": b.goodput, "runs": args.runs,
                    "results": [{**asdict(r), "median_ttfo": r.med("ttfo"), "median_exit": r.med("exit"),
                                 "median_bytes": r.med("bytes"), "median_pull": r.med("pull")} for r in results],
                    "floor": {img: b.floor(lazy.med("bytes"), warm_run(results, img)) for img in names
                              if (lazy := needed(results, img))},
                    "micro": micro_res, "command": " ".join(["python -m integration.bench", *(argv or sys.argv[1:])]),
                }, indent=1))
    except (BenchError, NetemError, RegistryError, images.ImageBuildError, ValueError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
