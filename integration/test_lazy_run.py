"""End to end: `lazyshim pull` of a real eStargz image, then `lazyshim run` with real runc,
real overlayfs and the real registry, files filled on open."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from integration.registry import Registry
from integration.storeview import layer_trees

LAZYSHIM = [sys.executable, "-m", "runtime.main"]


def lazyshim(store: Path, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, LAZYSHIM_ROOT=str(store))
    p = subprocess.run(LAZYSHIM + list(args), env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"lazyshim {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def _layer_dirs(store: Path) -> list[Path]:
    return sorted((store / "layers").iterdir())


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture(params=["notify", "ptrace"])
def trap(request, monkeypatch) -> str:
    """Run the test under each trap backend (LAZYSHIM_TRAP reaches every lazyshim it starts)."""
    monkeypatch.setenv("LAZYSHIM_TRAP", request.param)
    return request.param


def test_pull_builds_sparse_placeholders(store: Path, images: dict[str, str]) -> None:
    lazyshim(store, "pull", images["python:esgz"])
    py = next(p for t in layer_trees(store) for p in [t / "usr/bin/python3.11"] if p.exists())
    st = py.stat()
    assert st.st_size > 1_000_000
    assert st.st_blocks == 0, "a placeholder must not hold data before it is opened"
    assert st.st_mode & 0o777 == 0o755
    assert os.readlink(py.parent / "python3") in ("python3.11", "/usr/bin/python3.11")


@pytest.mark.usefixtures("trap")
def test_run_prints_before_the_image_is_downloaded(store: Path, images: dict[str, str],
                                                    registry: Registry) -> None:
    ref = images["python:esgz"]
    lazyshim(store, "pull", ref)
    registry.clear_access_log()
    p = lazyshim(store, "run", "--rm", "--no-background-fetch", ref, "python3", "-c",
                 "print('hello from a lazy image')")
    assert p.stdout == "hello from a lazy image\n"
    host, _, rest = ref.partition("/")
    manifest = _manifest(host, rest)
    total = sum(layer["size"] for layer in manifest["layers"])
    served = sum(registry.bytes_served(layer["digest"]) for layer in manifest["layers"])
    # The interpreter and libc are most of this small image; the stdlib stays behind.
    assert 0 < served < total * 0.8, f"fetched {served} of {total} bytes"
    filled = sum((d / "filled").read_bytes().count(1) for d in _layer_dirs(store))
    entries = sum(len((d / "filled").read_bytes()) for d in _layer_dirs(store))
    # Readahead fills a missed file's neighbours in the blob too, within a bounded window.
    assert filled < entries / 2, f"{filled} of {entries} entries filled"


@pytest.mark.usefixtures("trap")
def test_files_read_are_byte_identical(store: Path, images: dict[str, str]) -> None:
    ref = images["python:esgz"]
    script = (
        "import hashlib,sys\n"
        "for p in sys.argv[1:]:\n"
        "    print(p, hashlib.sha256(open(p,'rb').read()).hexdigest())\n"
    )
    files = ["/usr/bin/python3.11", "/usr/lib/python3.11/json/decoder.py", "/etc/passwd"]
    p = lazyshim(store, "run", "--rm", ref, "python3", "-c", script, *files)
    got = dict(line.split() for line in p.stdout.splitlines())
    assert got["/usr/bin/python3.11"] == _sha256("/usr/bin/python3.11")
    assert got["/usr/lib/python3.11/json/decoder.py"] == _sha256("/usr/lib/python3.11/json/decoder.py")


@pytest.mark.usefixtures("trap")
def test_shebang_script_with_unfilled_interpreter_runs(store: Path, images: dict[str, str]) -> None:
    ref = images["python:esgz"]
    lazyshim(store, "pull", ref)
    p = lazyshim(store, "run", "--rm", ref, "/usr/local/bin/hello.py")
    assert p.returncode == 0 and p.stdout.strip()


@pytest.mark.usefixtures("trap")
def test_corrupt_blob_fails_the_open_and_stores_nothing(tmp_path: Path, images: dict[str, str],
                                                         registry: Registry) -> None:
    """A byte flipped in the registry's copy of a file: the open fails with EIO; nothing is
    marked filled."""
    store = tmp_path / "store"
    ref = images["busybox:esgz"]
    lazyshim(store, "pull", ref)
    host, _, rest = ref.partition("/")
    manifest = _manifest(host, rest)
    # The app layer holds a > 1 MiB pseudo-random file; corrupt a byte in its middle.
    layer = manifest["layers"][-1]
    blob = registry.blob_path(rest.partition(":")[0], layer["digest"])
    original = blob.read_bytes()
    try:
        data = bytearray(original)
        data[len(data) // 3] ^= 0xFF
        blob.write_bytes(bytes(data))
        p = lazyshim(store, "run", "--rm", ref, "sh", "-c",
                     "for f in $(find / -xdev -type f -size +100k); do cat $f > /dev/null || echo FAIL $f; done",
                     check=False)
    finally:
        blob.write_bytes(original)
    assert "FAIL" in p.stdout, repr(p)
    layer_dir = store / "layers" / layer["digest"].replace(":", "-")
    filled = (layer_dir / "filled").read_bytes()
    assert filled.count(1) < len(filled)


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _manifest(host: str, name_tag: str) -> dict:
    from integration.images import fetch_manifest

    name, _, tag = name_tag.rpartition(":")
    return fetch_manifest(host, name, tag)


def test_a_fully_fetched_image_runs_without_a_supervisor(store: Path, images: dict[str, str]) -> None:
    """Steady state: once every file is on disk, containers start with no trap at all."""
    from integration.test_supervisor import _Container

    ref = images["busybox:esgz"]
    lazyshim(store, "pull", ref)
    lazyshim(store, "fetch", ref)
    assert all((d / "complete").exists() for d in _layer_dirs(store))
    c = _Container(store, ref, "cat /app/hello.txt; echo ready; read x")
    try:
        assert "hello from the app layer" in c.expect("ready")
        p = lazyshim(store, "stats", c.name, check=False)
        assert p.returncode == 1 and "no supervisor" in p.stderr, p.stderr
    finally:
        c.send("go")
        c.finish()


def test_bridge_network_gives_the_container_its_own_address(store: Path, images: dict[str, str]) -> None:
    """--network bridge: eth0 with an address of lazyshim's subnet and a default route via the
    bridge, set up by pyroute2 from runc's createRuntime hook; the address is freed after."""
    import ipaddress

    from runtime import network

    p = lazyshim(store, "run", "--rm", "--network", "bridge", images["busybox:esgz"], "sh", "-c",
                 "ip -4 addr show eth0; ip route")
    addrs = [w.split("/")[0] for line in p.stdout.splitlines() if "inet " in line for w in line.split()[1:2]]
    assert addrs and ipaddress.ip_address(addrs[0]) in network.SUBNET, p.stdout
    assert f"default via {network.GATEWAY} dev eth0" in p.stdout
    assert addrs[0] not in {f.name for f in network._state_dir().iterdir()}, "address released"
    # leave the host as found
    subprocess.run(["ip", "link", "del", network.BRIDGE], capture_output=True)
    subprocess.run(["iptables", "-t", "nat", "-D", "POSTROUTING", "-s", str(network.SUBNET), "!", "-o",
                    network.BRIDGE, "-j", "MASQUERADE"], capture_output=True)
