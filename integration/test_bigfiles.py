"""Big files read sparsely cost what they read: the container's FUSE layer of big files.

A 256 MiB weights file (integration/weights_image.py) is mapped with numpy and sampled:
only the touched 4 MiB chunks may come from the registry, every byte read must equal the
image's (the legacy image gives the same output), a chunk that fails verification is an
EIO or SIGBUS for the reader, and no mount or server outlives the container.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration import weights_image
from integration.faultproxy import Fault, FaultProxy
from integration.images import build_and_push, fetch_manifest
from integration.registry import Registry

LAZYSHIM = [sys.executable, "-m", "runtime.main"]
CHUNK = 4 << 20


@pytest.fixture(scope="module")
def weights(registry: Registry) -> dict[str, str]:
    weights_image.register()
    return build_and_push(registry, names=["weights"], variants=("legacy", "esgz", "zstdchunked"))


@pytest.fixture(scope="module")
def expected() -> str:
    return weights_image.expected_output(weights_image.weights_file())


@pytest.fixture
def rundir() -> Iterator[Path]:
    """Socket paths hold 107 bytes: a short runtime dir, as /run/lazyshim is."""
    d = Path(tempfile.mkdtemp(prefix="lzr-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _env(tmp_path: Path, rundir: Path) -> dict[str, str]:
    return dict(os.environ, LAZYSHIM_ROOT=str(tmp_path / "store"), LAZYSHIM_STORE_LAYOUT="v2",
                LAZYSHIM_RUNTIME_DIR=str(rundir))


def lazyshim(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(LAZYSHIM + list(args), env=env, capture_output=True, text=True, timeout=300,
                       stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"lazyshim {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def _weights_layer(ref: str) -> dict:
    host, _, rest = ref.partition("/")
    name, _, tag = rest.partition(":")
    return fetch_manifest(host, name, tag)["layers"][-1]


def _fuse_mounts_under(path: Path) -> list[str]:
    """FUSE mount points below `path` (by the file system type, after mountinfo's " - ")."""
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f
                if line.split()[4].startswith(str(path)) and line.partition(" - ")[2].startswith("fuse")]


@pytest.mark.parametrize("variant", ["esgz", "zstdchunked"])
def test_mapped_weights_fetch_only_touched_chunks(tmp_path: Path, rundir: Path, weights: dict[str, str], expected: str,
                                                  registry: Registry, variant: str) -> None:
    env = _env(tmp_path, rundir)
    ref = weights[f"weights:{variant}"]
    lazyshim(env, "pull", ref)
    layer = _weights_layer(ref)
    registry.clear_access_log()
    p = lazyshim(env, "run", "--rm", "--no-background-fetch", ref)
    assert p.stdout == expected, p.stderr
    served = registry.bytes_served(layer["digest"])
    touched = weights_image.WEIGHTS_BYTES // weights_image.STRIDE_BYTES  # the first also holds the header
    # each chunk compresses a little (the values keep their top bits in range)
    assert touched * CHUNK * 0.9 <= served <= touched * (CHUNK + (64 << 10)), f"{served} of {layer['size']}"
    assert layer["size"] > 250 << 20
    assert _fuse_mounts_under(tmp_path) == []
    if variant == "esgz":  # the legacy image (whole layers, no laziness) reads the same bytes
        assert lazyshim(env, "run", "--rm", weights["weights:legacy"]).stdout == expected


def test_second_container_reuses_verified_chunks(tmp_path: Path, rundir: Path, weights: dict[str, str], expected: str,
                                                 registry: Registry) -> None:
    env = _env(tmp_path, rundir)
    ref = weights["weights:esgz"]
    lazyshim(env, "pull", ref)
    layer = _weights_layer(ref)
    assert lazyshim(env, "run", "--rm", "--no-background-fetch", ref).stdout == expected
    registry.clear_access_log()
    assert lazyshim(env, "run", "--rm", "--no-background-fetch", ref).stdout == expected
    assert registry.bytes_served(layer["digest"]) == 0  # the chunks are in the store, checked again


def test_complete_big_file_is_read_natively(tmp_path: Path, rundir: Path, weights: dict[str, str]) -> None:
    """Once every chunk is verified the file becomes the data layer's object: the next
    container has no FUSE layer at all, and reads the same bytes."""
    env = _env(tmp_path, rundir)
    ref = weights["weights:esgz"]
    lazyshim(env, "pull", ref)
    read_all = "import hashlib;print(hashlib.sha256(open('/model/weights.npy','rb').read()).hexdigest())"
    want = hashlib.sha256(weights_image.weights_file().read_bytes()).hexdigest()
    first = lazyshim(env, "run", "--no-background-fetch", "--name", "first", ref, "/usr/bin/python3", "-c", read_all)
    assert first.stdout.strip() == want
    size = weights_image.weights_file().stat().st_size
    assert any(o.stat().st_size == size for o in (tmp_path / "store").glob("data/objects/*/*"))
    second = lazyshim(env, "run", "--no-background-fetch", "--name", "second", ref, "/usr/bin/python3", "-c",
                      read_all)
    assert second.stdout.strip() == want
    logs = {p.parent.name for p in (tmp_path / "store").rglob("bigfs.log")}
    assert logs == {"first"}, logs  # the second container started no FUSE server


PROBE = """
import mmap, os, sys
fd = os.open("/model/weights.npy", os.O_RDONLY)
try:
    os.pread(fd, 16, 100 << 20)
    print("READ-OK")
except OSError as e:
    print("READ-ERRNO", e.errno)
sys.stdout.flush()
m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
print("MAPPED", m[200 << 20])
"""


def test_corrupt_chunk_is_eio_or_sigbus_never_wrong_bytes(tmp_path: Path, rundir: Path, weights: dict[str, str],
                                                          registry: Registry) -> None:
    with FaultProxy(registry.host) as proxy:
        env = _env(tmp_path, rundir)
        ref = weights["weights:esgz"].replace(registry.host, proxy.host)
        lazyshim(env, "pull", ref)
        # python and its libraries filled first, so that only the weights' chunks meet the fault
        lazyshim(env, "run", "--rm", "--no-background-fetch", ref, "/usr/bin/python3", "-c", "import mmap, os, sys")
        proxy.set(Fault("corrupt"))
        p = lazyshim(env, "run", "--rm", "--no-background-fetch", ref, "/usr/bin/python3", "-c", PROBE, check=False)
        assert proxy.faulted >= 1
    assert "READ-ERRNO 5" in p.stdout, p.stdout + p.stderr
    assert "MAPPED" not in p.stdout
    assert p.returncode == 128 + 7, (p.returncode, p.stderr)  # SIGBUS
    assert _fuse_mounts_under(tmp_path) == []


def test_runc_path_with_the_image_annotation_serves_big_files_and_leaves_nothing(
        tmp_path: Path, rundir: Path, weights: dict[str, str], expected: str, registry: Registry) -> None:
    """`lazyshim run --bundle` of an empty rootfs with `run.lazyshim.image` (podman --rootfs):
    the overlay lazyshim mounts there gets the FUSE layer too, and loses it with the container."""
    from integration.test_runtime_cli import Runtime, bundle

    env = _env(tmp_path, rundir)
    ref = weights["weights:esgz"]
    lazyshim(env, "pull", ref)
    layer = _weights_layer(ref)
    empty = tmp_path / "rootfs"
    empty.mkdir()
    b = bundle(tmp_path, empty, ["/app/sample.py"],
               annotations={"run.lazyshim.image": ref, "run.lazyshim.background-fetch": "none"})
    rt = Runtime(tmp_path / "runc-root", env=env)
    registry.clear_access_log()
    p = rt("run", "--bundle", str(b), f"w{os.getpid()}", timeout=300)
    assert (p.returncode, p.stdout) == (0, expected), p.stderr
    served = registry.bytes_served(layer["digest"])
    assert served <= (weights_image.WEIGHTS_BYTES // weights_image.STRIDE_BYTES) * (CHUNK + (64 << 10))
    assert _fuse_mounts_under(tmp_path) == [] and not os.path.ismount(empty)


def test_a_killed_run_leaves_its_fuse_layer_to_the_next_command(new_env, weights: dict[str, str]) -> None:
    """`lazyshim run` killed while its container runs: the next lazyshim command detaches the
    FUSE mount and stops its server with the rest of the container."""
    from integration.lazyenv import poll

    env = new_env()
    env.env["LAZYSHIM_STORE_LAYOUT"] = "v2"
    ref = weights["weights:esgz"]
    env("pull", ref)
    name = f"bigorphan-{os.getpid()}"
    wait = "open('/ready', 'w').close(); open('/model/weights.npy', 'rb').read(10); import time; time.sleep(300)"
    proc = env.popen("run", "--rm", "--no-background-fetch", "--name", name, ref, "/usr/bin/python3", "-c", wait,
                     out=subprocess.DEVNULL)
    cdir = env.store / "containers" / name
    poll(lambda: (cdir / "upper" / "ready").exists() or proc.poll() is not None, f"{name} to write /ready")
    assert proc.poll() is None, "lazyshim run ended early"
    assert os.path.ismount(cdir / "big")
    server = int((cdir / "bigfs.pid").read_text())
    proc.kill()
    proc.wait(timeout=30)
    env("images")
    env.assert_nothing_left(name)
    poll(lambda: not os.path.exists(f"/proc/{server}") or b"shim.bigfs" not in _cmdline(server),
         "the FUSE server to exit")


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


# ---- chunks in the learned profile, the background, a dead server ---------------------------
TOUCHED = list(range(0, weights_image.WEIGHTS_BYTES // CHUNK, weights_image.STRIDE_BYTES // CHUNK))
#: The sample, once the test lets it go: so the test sees what was fetched before the reader asked.
GO_THEN_SAMPLE = "open('/sig/go').read(); exec(open('/app/sample.py').read())"
SAMPLE_THEN_WAIT = "exec(open('/app/sample.py').read()); import sys; sys.stdout.flush(); open('/sig/go').read()"


def _signal_dir(tmp_path: Path) -> Path:
    d = tmp_path / "sig"
    d.mkdir()
    os.mkfifo(d / "go")
    return d


def _release(sig: Path, proc: subprocess.Popen, before=None) -> None:
    """Let the container's workload go: once it waits on the fifo (a reader is there), one write
    (after `before()`, if given: what the test does while the workload waits)."""
    from integration.lazyenv import poll

    def writer() -> int | None:
        assert proc.poll() is None, f"the run ended early: {proc.communicate()}"
        try:
            return os.open(sig / "go", os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet
            return None
    fd = poll(writer, "the workload to wait on its fifo", timeout=240)
    if before is not None:
        before()
    os.write(fd, b"go")
    os.close(fd)


def _popen(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(LAZYSHIM + list(args), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_the_chunks_run_1_touched_are_fetched_at_the_start_of_run_2(tmp_path: Path, rundir: Path,
                                                                    weights: dict[str, str], expected: str,
                                                                    registry: Registry) -> None:
    """Run 1 learns which chunks of the weights the workload touched; on a fresh store given
    only that profile, run 2's FUSE layer fetches exactly those before the workload reads any
    (it waits on a fifo meanwhile), and the workload's reads then fetch nothing more."""
    from integration.lazyenv import poll

    ref = weights["weights:esgz"]
    layer = _weights_layer(ref)
    sig = _signal_dir(tmp_path)
    cmd = ["-v", f"{sig}:/sig", ref, "/usr/bin/python3", "-c", GO_THEN_SAMPLE]
    env = _env(tmp_path, rundir)
    lazyshim(env, "pull", ref)
    run1 = _popen(env, "run", "--rm", "--no-background-fetch", *cmd)
    _release(sig, run1)
    out, err = run1.communicate(timeout=300)
    assert (run1.returncode, out) == (0, expected), err
    shown = json.loads(lazyshim(env, "profile", "show", "--format", "json", ref).stdout)
    (big,) = shown[0]["chunks"]
    assert big["path"] == "/model/weights.npy" and big["chunks"] == TOUCHED, big["chunks"]
    exported = tmp_path / "profile.json"
    lazyshim(env, "profile", "export", "-o", str(exported), ref)

    fresh = dict(_env(tmp_path, rundir), LAZYSHIM_ROOT=str(tmp_path / "fresh"),
                 LAZYSHIM_BACKGROUND_FETCH="prioritized")  # the profile, nothing of the rest
    lazyshim(fresh, "profile", "import", str(exported))
    lazyshim(fresh, "pull", ref)
    registry.clear_access_log()
    run2 = _popen(fresh, "run", "--rm", *cmd)
    want = len(TOUCHED) * CHUNK * 0.9
    poll(lambda: registry.bytes_served(layer["digest"]) >= want or run2.poll() is not None,
         "the profile's chunks to be fetched", timeout=240)
    assert run2.poll() is None  # the workload has not read a byte of the weights yet
    _release(sig, run2)
    out, err = run2.communicate(timeout=300)
    assert (run2.returncode, out) == (0, expected), err
    assert registry.bytes_served(layer["digest"]) <= len(TOUCHED) * (CHUNK + (64 << 10))  # none fetched twice


def test_a_hostile_profile_of_chunks_is_refused_with_one_line(tmp_path: Path, rundir: Path) -> None:
    env = _env(tmp_path, rundir)
    doc = {"v": 1, "image": "sha256:" + "a" * 64, "registry": "127.0.0.1:5000", "repository": "weights",
           "command": {"args": ["/app/sample.py"], "cwd": "/"}, "files": []}
    for chunks, words in ((["model/weights.npy", "", 256 << 20, list(range(70000))], "more than 65536 chunks"),
                          (["model/weights.npy", "", 8 << 20, [3, 1 << 40]], "out of range")):
        path = tmp_path / "hostile.json"
        path.write_text(json.dumps(dict(doc, chunks=[chunks])))
        p = lazyshim(env, "profile", "import", str(path), check=False)
        assert p.returncode != 0 and words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert lazyshim(env, "profile", "show", "--format", "json").stdout.strip() == "[]"


def test_the_background_completes_a_big_file_and_the_next_container_reads_it_natively(
        tmp_path: Path, rundir: Path, weights: dict[str, str], expected: str, registry: Registry) -> None:
    """Background fetch `all`: while the workload waits after its sample, the FUSE layer fetches
    the other chunks, verifies the whole file and publishes it; the next container has no FUSE
    layer and fetches nothing of the weights."""
    from integration.lazyenv import poll

    env = _env(tmp_path, rundir)
    ref = weights["weights:esgz"]
    layer = _weights_layer(ref)
    lazyshim(env, "pull", ref)
    sig = _signal_dir(tmp_path)
    size = weights_image.weights_file().stat().st_size
    run = _popen(env, "run", "--rm", "-v", f"{sig}:/sig", ref, "/usr/bin/python3", "-c", SAMPLE_THEN_WAIT)
    poll(lambda: any(o.stat().st_size == size for o in (tmp_path / "store").glob("data/objects/*/*"))
         or run.poll() is not None, "the weights to be published", timeout=240)
    _release(sig, run)
    out, err = run.communicate(timeout=300)
    assert (run.returncode, out) == (0, expected), err
    registry.clear_access_log()
    second = lazyshim(env, "run", "--no-background-fetch", "--name", "second", ref)
    assert second.stdout == expected
    assert registry.bytes_served(layer["digest"]) == 0
    assert not (tmp_path / "store" / "containers" / "second" / "bigfs.log").exists()  # no FUSE layer


# PROBE, after a read that starts the file and then waiting for the go (the server is killed meanwhile).
KILLED = PROBE.replace('fd = os.open("/model/weights.npy", os.O_RDONLY)\n',
                       'fd = os.open("/model/weights.npy", os.O_RDONLY)\nos.pread(fd, 16, 0)\n'
                       'open("/sig/go").read()\n', 1)
assert KILLED != PROBE, "PROBE changed: KILLED no longer waits for the go"


def test_a_killed_fuse_server_is_an_error_for_readers_and_its_mount_is_still_detached(
        tmp_path: Path, rundir: Path, weights: dict[str, str]) -> None:
    """The FUSE server killed under a running container: the reader of a chunk it had not
    served gets ENOTCONN/EIO (a mapping SIGBUS), never a hang or other bytes, and the teardown
    detaches the dead mount (whose stat fails: os.path.ismount would say "not mounted")."""
    import signal

    from integration.lazyenv import poll

    env = _env(tmp_path, rundir)
    ref = weights["weights:esgz"]
    lazyshim(env, "pull", ref)
    sig = _signal_dir(tmp_path)
    name = f"killfuse-{os.getpid()}"
    cdir = tmp_path / "store" / "containers" / name
    run = _popen(env, "run", "--rm", "--no-background-fetch", "--name", name, "-v", f"{sig}:/sig", ref,
                 "/usr/bin/python3", "-c", KILLED)

    def dead(server: int) -> bool:  # gone, or a zombie its parent (lazyshim run) has not reaped
        try:
            return Path(f"/proc/{server}/stat").read_text().rpartition(")")[2].split()[0] == "Z"
        except OSError:
            return True

    def kill_server() -> None:  # the workload has read the first chunk and waits on the fifo
        server = int((cdir / "bigfs.pid").read_text())
        assert b"shim.bigfs" in _cmdline(server)
        os.kill(server, signal.SIGKILL)
        poll(lambda: dead(server), "the FUSE server to die")
    _release(sig, run, kill_server)
    out, err = run.communicate(timeout=120)
    errno_line = next((line for line in out.splitlines() if line.startswith("READ-")), "")
    assert errno_line in ("READ-ERRNO 107", "READ-ERRNO 5"), out + err  # ENOTCONN or EIO
    assert "MAPPED" not in out
    assert run.returncode == 128 + 7, (run.returncode, err)  # SIGBUS
    assert _fuse_mounts_under(tmp_path) == []
    assert not cdir.exists()
