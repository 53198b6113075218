"""The runc command-line contract, end to end: real runc, real overlayfs, the real registry,
podman with `--runtime lazyshim`.

A lazy bundle here is what podman or containerd would hand us: a config.json whose root.path
is an overlay mounted from the placeholder trees of a `lazyshim pull`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.images import RANDOM_FILE_SIZE
from integration.storeview import file_filled
from integration.test_lazy_run import trap  # noqa: F401 - a fixture
from runtime import overlay, spec
from runtime.paths import oci_state_dir

LAZYSHIM = str(Path(sys.executable).parent / "lazyshim")
RUNC = shutil.which("runc") or "runc"
RANDOM_SHA = hashlib.sha256(random.Random(20240601).randbytes(RANDOM_FILE_SIZE)).hexdigest()


def sh(*argv: str, env: dict | None = None, cwd: Path | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess:
    """Output through files, not pipes: a created container keeps the stdio it was given
    open, and a pipe would never see EOF (runc behaves the same)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.run(list(argv), stdout=out, stderr=err, timeout=timeout, env=env, cwd=cwd,
                           stdin=subprocess.DEVNULL)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(p.args, p.returncode, out.read().decode(), err.read().decode())


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"{p.args} -> {p.returncode}: {p.stderr.strip()}"
    return p


def poll(pred, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Store:
    """A private LAZYSHIM_ROOT with one pulled image, and overlay rootfs made from it."""

    def __init__(self, root: Path, ref: str) -> None:
        self.root = root
        self.ref = ref
        self.env = dict(os.environ, LAZYSHIM_ROOT=str(root))
        ok(sh(LAZYSHIM, "pull", ref, env=self.env))
        from shim import api

        st = api.open_store(root)
        self.image = api.ensure_image(st, ref, pull=False)
        self.spec = api.layer_mount(st, self.image)
        self.trees = self.spec.lowers
        self.mounts: list[Path] = []

    def rootfs(self, base: Path) -> Path:
        for d in ("upper", "work", "merged"):
            (base / d).mkdir(parents=True)
        overlay.mount_overlay(self.trees, base / "upper", base / "work", base / "merged",
                              data_lowers=self.spec.data_lowers, options=self.spec.options)
        self.mounts.append(base / "merged")
        return base / "merged"

    def filled(self, path: str) -> bool:
        """The image file at `path` has its content in the store."""
        return file_filled(self.root, path)

    def close(self) -> None:
        for m in self.mounts:
            overlay.unmount(m)


@pytest.fixture
def busybox(tmp_path: Path, images: dict[str, str]) -> Iterator[Store]:
    s = Store(tmp_path / "store", images["busybox:esgz"])
    yield s
    s.close()


def bundle(base: Path, rootfs: Path | str, args: list[str], **extra) -> Path:
    b = base / "bundle"
    b.mkdir(parents=True)
    cfg = spec.build_spec(rootfs=str(rootfs), args=args, env=["PATH=/bin:/usr/bin"], cwd="/", uid=0, gid=0,
                          hostname="t", terminal=False, network="none")
    cfg.update(extra)
    (b / "config.json").write_text(json.dumps(cfg))
    return b


class Runtime:
    """`lazyshim --root R ...` (or runc with the same root) for one test."""

    def __init__(self, root: Path, env: dict | None = None) -> None:
        self.root = root
        self.env = env

    def __call__(self, *args: str, binary: str = LAZYSHIM, **kw) -> subprocess.CompletedProcess:
        return sh(binary, "--root", str(self.root), *args, env=kw.pop("env", self.env), **kw)

    def state(self, cid: str) -> dict:
        return json.loads(ok(self("state", cid)).stdout)

    def wait_stopped(self, cid: str) -> None:
        poll(lambda: self.state(cid)["status"] == "stopped", what=f"{cid} to stop")

    def cleanup(self) -> None:
        for cid in os.listdir(self.root) if self.root.exists() else []:
            self("delete", "--force", cid)


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    # Only what the container opens gets filled, so the tests can tell what was opened.
    r = Runtime(tmp_path / "runc-root", env=dict(os.environ, LAZYSHIM_BACKGROUND_FETCH="none"))
    yield r
    r.cleanup()


def supervisor_pid(rt: Runtime, cid: str) -> int:
    return int((Path(oci_state_dir(str(rt.root), cid)) / "supervisor.pid").read_text())


def alive(pid: int) -> bool:
    try:
        return b"shim.supervisor" in Path(f"/proc/{pid}/cmdline").read_bytes() and \
            Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


# ---- (a) runc-style lifecycle on a lazy bundle --------------------------------------------
@pytest.mark.usefixtures("trap")
def test_lazy_bundle_create_state_start_delete(tmp_path: Path, busybox: Store, rt: Runtime) -> None:
    rootfs = busybox.rootfs(tmp_path / "c")
    script = "cat /app/hello.txt > /result.txt; sha256sum /app/random.bin >> /result.txt"
    b = bundle(tmp_path, rootfs, ["sh", "-c", script])
    before = (b / "config.json").read_bytes()
    assert not busybox.filled("/app/random.bin")
    pidfile = tmp_path / "pid"

    ok(rt("create", "--bundle", str(b), "--pid-file", str(pidfile), "c1"))
    st = rt.state("c1")
    assert {k: st[k] for k in ("ociVersion", "id", "status", "bundle")} == {
        "ociVersion": st["ociVersion"], "id": "c1", "status": "created", "bundle": str(b)}
    assert st["rootfs"] == str(rootfs)
    assert st["pid"] == int(pidfile.read_text()) > 0
    assert (b / "config.json").read_bytes() == before, "the caller's config.json must not change"
    sup = supervisor_pid(rt, "c1")
    assert alive(sup)

    ok(rt("start", "c1"))
    rt.wait_stopped("c1")
    result = (tmp_path / "c" / "upper" / "result.txt").read_text().splitlines()
    assert result == ["hello from the app layer", f"{RANDOM_SHA}  /app/random.bin"]
    assert file_filled(busybox.root, "/app/random.bin"), "filled in the store"

    ok(rt("delete", "c1"))
    poll(lambda: not alive(sup), what="the supervisor to exit")
    assert not Path(oci_state_dir(str(rt.root), "c1")).exists()
    gone = rt("state", "c1")
    assert gone.returncode == 1 and "does not exist" in gone.stderr


@pytest.mark.usefixtures("trap")
def test_runc_style_run_of_a_lazy_python_bundle(tmp_path: Path, images: dict[str, str], rt: Runtime) -> None:
    """`run --bundle` in the foreground: stdout and the exit code are the container's."""
    store = Store(tmp_path / "store", images["python:esgz"])
    try:
        rootfs = store.rootfs(tmp_path / "c")
        script = "import json; print(json.dumps({'lazy': 1})); raise SystemExit(7)"
        b = bundle(tmp_path, rootfs, ["python3", "-c", script],
                   annotations={"run.lazyshim.background-fetch": "none"})  # only what python opens
        p = rt("run", "--bundle", str(b), "py1")
        assert (p.returncode, p.stdout) == (7, '{"lazy": 1}\n'), p.stderr
        assert not Path(oci_state_dir(str(rt.root), "py1")).exists(), "run without --detach cleans up"
        assert store.filled("/usr/bin/python3.11")
        assert store.filled("/usr/lib/python3.11/json/decoder.py")
        assert not store.filled("/usr/lib/python3.11/xml/dom/minidom.py")
    finally:
        store.close()


# ---- (b) a plain bundle passes straight through --------------------------------------------
@pytest.fixture
def plain_rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "plain-rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for applet in ("sh", "echo", "cat", "sleep"):
        (root / "bin" / applet).symlink_to("busybox")
    return root


def test_plain_bundle_behaves_exactly_like_runc(tmp_path: Path, plain_rootfs: Path, rt: Runtime) -> None:
    b = bundle(tmp_path, "../plain-rootfs", ["sh", "-c", "echo out; echo err >&2; exit 3"])
    # Relative --bundle and a relative root.path, resolved against our cwd as runc does.
    mine = rt("run", "-b", "bundle", "p1", cwd=tmp_path)
    theirs = rt("run", "-b", "bundle", "p2", binary=RUNC, cwd=tmp_path)
    assert (mine.returncode, mine.stdout, mine.stderr) == (3, "out\n", "err\n")
    assert (theirs.returncode, theirs.stdout, theirs.stderr) == (mine.returncode, mine.stdout, mine.stderr)
    assert not Path(oci_state_dir(str(rt.root), "p1")).parent.exists(), "no lazyshim state for a plain bundle"

    ok(rt("create", "--bundle", str(b), "p3"))
    assert rt.state("p3")["bundle"] == str(b)
    assert rt("state", "p3").stdout == rt("state", "p3", binary=RUNC).stdout
    assert rt("list").stdout == rt("list", binary=RUNC).stdout
    ok(rt("delete", "p3"))


def test_features_spec_and_version_pass_through(tmp_path: Path) -> None:
    assert ok(sh(LAZYSHIM, "features")).stdout == ok(sh(RUNC, "features")).stdout
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ok(sh(LAZYSHIM, "spec", "--rootless", cwd=tmp_path / "a"))
    ok(sh(RUNC, "spec", "--rootless", cwd=tmp_path / "b"))
    assert (tmp_path / "a/config.json").read_text() == (tmp_path / "b/config.json").read_text()
    mine, theirs = ok(sh(LAZYSHIM, "--version")).stdout, ok(sh(RUNC, "--version")).stdout
    assert mine.startswith(theirs) and mine[len(theirs):].startswith("lazyshim: ")


# ---- (d) errors: one line, runc's JSON log, exit code 1 ------------------------------------
def _check_error(p: subprocess.CompletedProcess, log: Path, words: str) -> None:
    assert p.returncode == 1, p
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert words in p.stderr
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["level"] == "error" and words in last["msg"] and last["time"]


def test_errors_are_one_line_and_logged_as_json(tmp_path: Path, rt: Runtime) -> None:
    log = tmp_path / "log.json"
    lg = ("--log", str(log), "--log-format", "json")
    _check_error(sh(LAZYSHIM, "--root", str(rt.root), *lg, "state", "nope"), log, "does not exist")
    _check_error(sh(LAZYSHIM, "--root", str(rt.root), *lg, "kill", "nope", "9"), log, "does not exist")
    _check_error(sh(LAZYSHIM, "--root", str(rt.root), *lg, "state", "../x"), log, "invalid container ID")
    _check_error(sh(LAZYSHIM, "--root", str(rt.root), *lg, "create", "--bogus", "x"), log, "bogus")
    _check_error(sh(LAZYSHIM, "--root", str(rt.root), *lg, "create", "--bundle", str(tmp_path / "nope"), "x"),
                 log, "no such file")
    # Our own errors, before any delegate ran.
    env = dict(os.environ, LAZYSHIM_DELEGATE="no-such-runtime")
    _check_error(sh(LAZYSHIM, *lg, "state", "x", env=env), log, "no-such-runtime")
    empty = tmp_path / "empty"
    empty.mkdir()
    b = bundle(tmp_path, empty, ["true"], annotations={"run.lazyshim.image": "127.0.0.1:1/none:tag"})
    env = dict(os.environ, LAZYSHIM_ROOT=str(tmp_path / "store"))
    _check_error(sh(LAZYSHIM, "--root", str(rt.root), *lg, "create", "--bundle", str(b), "x", env=env), log,
                 "127.0.0.1:1")
    assert not Path(oci_state_dir(str(rt.root), "x")).exists()


# ---- (e) exec, kill and delete --force on a running lazy container ------------------------
@pytest.mark.usefixtures("trap")
def test_exec_fills_files_kill_and_force_delete(tmp_path: Path, busybox: Store, rt: Runtime) -> None:
    rootfs = busybox.rootfs(tmp_path / "c")
    b = bundle(tmp_path, rootfs, ["sleep", "1000"])
    ok(rt("create", "--bundle", str(b), "e1"))
    ok(rt("start", "e1"))
    assert rt.state("e1")["status"] == "running"
    sup = supervisor_pid(rt, "e1")
    assert not busybox.filled("/app/random.bin")

    # exec CMD...: a new notify fd; the exec'd process's open fills the file.
    p = ok(rt("exec", "e1", "sha256sum", "/app/random.bin"))
    assert p.stdout.split()[0] == RANDOM_SHA
    assert busybox.filled("/app/random.bin")
    # exec -p process.json, with the container's exit code; then a flag after the id.
    proc = {"args": ["sh", "-c", "cat /app/hello.txt; exit 5"], "cwd": "/", "env": ["PATH=/bin"],
            "user": {"uid": 0, "gid": 0}}
    (tmp_path / "process.json").write_text(json.dumps(proc))
    p = rt("exec", "--process", str(tmp_path / "process.json"), "e1")
    assert (p.returncode, p.stdout) == (5, "hello from the app layer\n")
    p = rt("exec", "--env", "X=1", "--cwd", "/app", "e1", "sh", "-c", "echo $X $(pwd)")
    assert ok(p).stdout == "1 /app\n"

    ok(rt("kill", "e1", "9"))
    rt.wait_stopped("e1")
    ok(rt("delete", "--force", "e1"))
    poll(lambda: not alive(sup), what="the supervisor to exit")
    assert not Path(oci_state_dir(str(rt.root), "e1")).exists()


@pytest.mark.usefixtures("trap")
def test_delete_force_of_a_running_lazy_container(tmp_path: Path, busybox: Store, rt: Runtime) -> None:
    b = bundle(tmp_path, busybox.rootfs(tmp_path / "c"), ["sleep", "1000"])
    ok(rt("create", "--bundle", str(b), "f1"))
    ok(rt("start", "f1"))
    sup = supervisor_pid(rt, "f1")
    not_forced = rt("delete", "f1")
    assert not_forced.returncode == 1 and alive(sup), "a refused delete leaves the supervisor"
    ok(rt("delete", "--force", "f1"))
    poll(lambda: not alive(sup), what="the supervisor to exit")
    assert rt("list", "-q").stdout == ""


def test_annotation_mounts_the_image_on_an_empty_rootfs(tmp_path: Path, images: dict[str, str],
                                                        rt: Runtime) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    b = bundle(tmp_path, empty, ["cat", "/app/hello.txt"], annotations={"run.lazyshim.image": images["busybox:esgz"]})
    r = Runtime(rt.root, env=dict(os.environ, LAZYSHIM_ROOT=str(tmp_path / "store")))
    p = r("run", "--bundle", str(b), "a1")
    assert (p.returncode, p.stdout) == (0, "hello from the app layer\n"), p.stderr
    assert os.listdir(empty) == [], "unmounted again"


# ---- (c) podman --runtime lazyshim --------------------------------------------------------
@pytest.fixture
def podman(tmp_path: Path) -> Iterator[list[str]]:
    # podman refuses a runroot path longer than 50 characters: keep it short.
    top = Path(tempfile.mkdtemp(prefix="lzp-"))
    argv = ["podman", "--root", str(top / "root"), "--runroot", str(top / "run"), "--storage-driver", "vfs",
            "--cgroup-manager", "cgroupfs", "--events-backend", "none", "--runtime", LAZYSHIM]
    yield argv
    sh(*argv, "rm", "--all", "--force")
    shutil.rmtree(top, ignore_errors=True)


RUN_FLAGS = ["run", "--rm", "--network", "none", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768"]


def test_podman_plain_rootfs(podman: list[str], plain_rootfs: Path) -> None:
    p = sh(*podman, *RUN_FLAGS, "--rootfs", str(plain_rootfs), "sh", "-c", "echo hi from podman; exit 4")
    assert (p.returncode, p.stdout) == (4, "hi from podman\n"), p.stderr


def test_podman_lazy_rootfs_fills_on_open(tmp_path: Path, podman: list[str], busybox: Store) -> None:
    rootfs = busybox.rootfs(tmp_path / "c")
    assert not busybox.filled("/app/random.bin")
    # podman does not pass LAZYSHIM_ROOT on: the store is found from the overlay's lowerdirs.
    env = {k: v for k, v in os.environ.items() if k != "LAZYSHIM_ROOT"}
    p = sh(*podman, *RUN_FLAGS, "--rootfs", str(rootfs), "sh", "-c", "cat /app/hello.txt; sha256sum /app/random.bin",
           env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["hello from the app layer", f"{RANDOM_SHA}  /app/random.bin"]
    assert busybox.filled("/app/random.bin")


def _supervisors_of(rootfs: Path) -> list[bytes]:
    """The command lines of the supervisors serving `rootfs` (it is in their argv)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"shim.supervisor" in argv and b"\0" + os.fsencode(rootfs) + b"\0" in argv:
            out.append(argv)
    return out


def test_podman_lazy_rootfs_under_the_ptrace_backend(tmp_path: Path, podman: list[str], busybox: Store) -> None:
    """podman passes no environment on: the runtime it is given sets LAZYSHIM_TRAP (as the
    config file would).  create, the hook, start and exec all go through podman's conmon."""
    rootfs = busybox.rootfs(tmp_path / "c")
    runtime = tmp_path / "lazyshim-ptrace"
    runtime.write_text(f"#!/bin/sh\nLAZYSHIM_TRAP=ptrace exec {LAZYSHIM} \"$@\"\n")
    runtime.chmod(0o755)
    argv = [a if a != LAZYSHIM else str(runtime) for a in podman]
    env = {k: v for k, v in os.environ.items() if k != "LAZYSHIM_ROOT"}
    name = f"pt{os.getpid()}"
    proc = subprocess.Popen([*argv, *RUN_FLAGS, "-i", "--name", name, "--rootfs", str(rootfs), "sh", "-c",
                             "cat /app/hello.txt; echo ready; read x; sha256sum /app/random.bin"],
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline() == "hello from the app layer\n"
        assert proc.stdout.readline() == "ready\n"
        sups = _supervisors_of(rootfs)
        assert len(sups) == 1 and b"--trap\0ptrace" in sups[0], sups
        p = sh(*argv, "exec", name, "cat", "/app/hello.sh", env=env)
        assert (p.returncode, p.stdout) == (0, "#!/bin/sh\necho hello from busybox sh\n"), p.stderr
        out, err = proc.communicate("go\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out == f"{RANDOM_SHA}  /app/random.bin\n"
    assert busybox.filled("/app/random.bin")
