"""Big files read sparsely cost what they read: the container's FUSE layer of big files.

A 256 MiB weights file (integration/weights_image.py) is mapped with numpy and sampled:
only the touched 4 MiB chunks may come from the registry, every byte read must equal the
image's (the legacy image gives the same output), a chunk that fails verification is an
EIO or SIGBUS for the reader, and no mount or server outlives the container.
"""

from __future__ import annotations

import hashlib
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
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[4].startswith(str(path)) and "fuse" in line]


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
