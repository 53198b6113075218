"""End to end: a real containerd 1.6 pulls the python eStargz image through `lazyshim
snapshotter` (ctr-remote's rpull passes the layer labels), real runc runs it through
`lazyshim` as `--runc-binary`, and the real registry's access log says what moved."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration.images import fetch_manifest, private_containerd_config
from integration.procs import stop_group, wait_for_socket
from integration.registry import Registry
from integration.storeview import release_store_mounts_below

REPO = Path(__file__).resolve().parent.parent
LAZYSHIM_BIN = Path(sys.executable).parent / "lazyshim"
NAMESPACE = "lazyshim-snap"
SNAPSHOTTER = "lazyshim"


@dataclass
class Node:
    """A containerd with our proxy snapshotter, each with its own root, state and socket."""

    dir: Path
    store: Path
    snap_root: Path
    snap_sock: Path
    sock: Path
    snapshotter: subprocess.Popen | None = None
    containerd: subprocess.Popen | None = None

    def start_snapshotter(self) -> None:
        log = self.dir / "snapshotter.log"
        env = dict(os.environ, LAZYSHIM_ROOT=str(self.dir / "not-this-store"))  # --store wins
        with open(log, "ab") as f:
            self.snapshotter = subprocess.Popen(
                [str(LAZYSHIM_BIN), "snapshotter", "--address", str(self.snap_sock), "--root", str(self.snap_root),
                 "--store", str(self.store)],
                env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True)
        wait_for_socket(self.snap_sock, self.snapshotter, log, "lazyshim snapshotter")

    def stop_snapshotter(self) -> None:
        proc, self.snapshotter = self.snapshotter, None
        stop_group(proc, 20)
        assert proc is not None and proc.returncode == 0, f"snapshotter exited with {proc and proc.returncode}"

    def start_containerd(self) -> None:
        root, state = self.dir / "root", self.dir / "state"
        cfg = self.dir / "containerd.toml"
        cfg.write_text(private_containerd_config(
            root, state, self.sock,
            extra=f'[proxy_plugins.{SNAPSHOTTER}]\n  type = "snapshot"\n  address = "{self.snap_sock}"\n'))
        log = self.dir / "containerd.log"
        with open(log, "ab") as f:
            self.containerd = subprocess.Popen(
                ["containerd", "--config", str(cfg)], stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                start_new_session=True)
        wait_for_socket(self.sock, self.containerd, log, "containerd")

    def ctr(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        p = subprocess.run(["ctr-remote", "--address", str(self.sock), "--namespace", NAMESPACE, *args],
                           capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"ctr {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()[-1500:]}")
        return p

    def view(self, key: str, parent: str) -> None:
        """`ctr snapshots view`, but with the label `ctr snapshots prepare` gives: containerd's
        GC (run after every removal) collects a snapshot that no lease or label roots, and ctr's
        view sets none, so the view could vanish before the test mounts it."""
        import grpc

        from shim.snapshotter import proto

        req_t, resp_t = (proto.MESSAGES[m] for m in proto.METHODS["View"])
        with grpc.insecure_channel(f"unix:{self.sock}") as channel:
            view = channel.unary_unary(f"/{proto.SERVICE}/View", request_serializer=req_t.SerializeToString,
                                       response_deserializer=resp_t.FromString)
            view(req_t(snapshotter=SNAPSHOTTER, key=key, parent=parent,
                       labels={"containerd.io/gc.root": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}),
                 metadata=(("containerd-namespace", NAMESPACE),), timeout=300)

    def snapshot_keys(self, timeout: float = 60) -> set[str]:
        """Keys containerd lists.  Right after a snapshotter restart containerd's connection
        is in its reconnect back-off and answers Unavailable: ask again until it is back."""
        deadline = time.monotonic() + timeout
        while True:
            p = self.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "ls", check=False)
            if p.returncode == 0:
                return {line.split()[0] for line in p.stdout.splitlines()[1:] if line.strip()}
            if "unavailable" not in p.stderr or time.monotonic() > deadline:
                raise AssertionError(f"ctr snapshots ls failed ({p.returncode}): {p.stderr.strip()[-800:]}")
            time.sleep(0.2)

    def state(self) -> dict:
        return json.loads((self.snap_root / "state.json").read_text())

    def mounts(self) -> list[str]:
        """Mount points under this node's dir but the store's metadata tmpfs (layout v2), which
        stays for as long as the store does; the layers' views on it go with their layers."""
        from shim.store.layout import Store
        from shim.store.layouts import view_root

        own = os.path.realpath(view_root(Store(self.store)))
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        return [p for p in points if p.startswith(f"{self.dir}/") and p != own]

    def stop(self) -> None:
        stop_group(self.containerd, 20)
        stop_group(self.snapshotter, 20)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    d = tmp_path_factory.mktemp("snapnode")
    n = Node(dir=d, store=d / "store", snap_root=d / "snapshots", snap_sock=d / "snapshotter.sock",
             sock=d / "containerd.sock")
    try:
        n.start_snapshotter()
        n.start_containerd()
        yield n
    finally:
        n.stop()
        release_store_mounts_below(d)  # the store's metadata tmpfs (layout v2), before d goes


@pytest.fixture(scope="module")
def pulled(node: Node, images: dict[str, str], registry: Registry) -> dict:
    """rpull of the python eStargz image through our snapshotter; what the registry served."""
    ref = images["python:esgz"]
    host, _, name_tag = ref.partition("/")
    name, _, tag = name_tag.rpartition(":")
    manifest = fetch_manifest(host, name, tag)
    registry.clear_access_log()
    node.ctr("image", "rpull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref)
    layers = [layer["digest"] for layer in manifest["layers"]]
    requests = {d: registry.blob_requests(d) for d in layers}
    return {"ref": ref, "manifest": manifest, "layers": layers, "requests": requests}


def test_rpull_fetches_only_footers_and_tocs(node: Node, pulled: dict) -> None:
    for layer in pulled["manifest"]["layers"]:
        reqs = pulled["requests"][layer["digest"]]
        assert reqs, f"layer {layer['digest'][:19]}: no request at all"
        assert all(r.status == 206 for r in reqs), f"layer {layer['digest'][:19]}: a full GET: {reqs}"
        served = sum(r.size for r in reqs)
        assert served < layer["size"] / 2, f"layer {layer['digest'][:19]}: {served} of {layer['size']} bytes"
    lazy = [s for s in node.state()["snapshots"].values() if s["layer"]]
    assert sorted(s["layer"] for s in lazy) == sorted(pulled["layers"])
    built = {d.name for d in (node.store / "layers").iterdir()}
    assert {digest.replace(":", "-") for digest in pulled["layers"]} <= built


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


SCRIPT = (
    "import hashlib,sys\n"
    "print('hello from containerd')\n"
    "for p in sys.argv[1:]:\n"
    "    print(p, hashlib.sha256(open(p,'rb').read()).hexdigest())\n"
)
FILES = ["/usr/bin/python3.11", "/usr/lib/python3.11/json/decoder.py"]


def _filled(store: Path) -> int:
    return sum((d / "filled").read_bytes().count(1) for d in (store / "layers").iterdir())


def _far_unfilled_stdlib_file(store: Path) -> str:
    """A stdlib file no fill so far has reached, the last such in its blob: readahead fills a
    missed file's neighbours, so a fixed name may already be there."""
    from shim.store.layout import Store
    from shim.store.layouts import load_meta

    s = Store(store)
    best = (-1, "")
    for d in s.layers.iterdir():
        marks = (d / "filled").read_bytes()
        for i, e in enumerate(load_meta(s, d.name.replace("-", ":", 1)).toc.entries):
            if e.type == "reg" and e.size and e.chunks and e.name.startswith("usr/lib/python3.11/") \
                    and e.name.endswith(".py") and not marks[i]:
                best = max(best, (e.chunks[0].offset, "/" + e.name))
    assert best[1], "every stdlib file is filled already"
    return best[1]


def test_ctr_run_through_lazyshim_prints_verified_bytes(node: Node, pulled: dict) -> None:
    before = _filled(node.store)
    p = node.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, "--runc-binary", str(LAZYSHIM_BIN),
                 pulled["ref"], "lazy-run-1", "/usr/bin/python3", "-c", SCRIPT, *FILES)
    lines = p.stdout.splitlines()
    assert lines[0] == "hello from containerd"
    got = dict(line.split() for line in lines[1:])
    assert got == {f: _sha256(f) for f in FILES}
    assert _filled(node.store) > before, "the supervisor filled nothing: the rootfs was not seen as lazy"


def _dead_staging(store: Path) -> Path:
    """A layer staging dir, as a builder killed mid-Prepare leaves it: its pid has exited."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    staging = store / "tmp" / f"sha256-{'0' * 64}.{proc.pid}"
    (staging / "tree").mkdir(parents=True)
    return staging


def test_restart_keeps_snapshots(node: Node, pulled: dict) -> None:
    keys = node.snapshot_keys()
    assert len(keys) >= len(pulled["layers"])
    node.stop_snapshotter()
    staging = _dead_staging(node.store)
    node.start_snapshotter()
    assert not staging.exists(), "a staging dir of a dead builder survived the snapshotter's start"
    assert node.snapshot_keys() == keys
    p = node.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, "--runc-binary", str(LAZYSHIM_BIN),
                 pulled["ref"], "lazy-run-2", "/usr/bin/python3", "-c", "print('again')")
    assert p.stdout == "again\n"


# Handshake through two FIFOs in a bind mount: "ready" once running, then wait for "go".
SURVIVOR = (
    "import os, select, hashlib, sys\n"
    "g = os.open('/x/go', os.O_RDONLY | os.O_NONBLOCK)\n"
    "r = os.open('/x/ready', os.O_WRONLY)\n"
    "os.write(r, b'r'); os.close(r)\n"
    "select.select([g], [], [])\n"
    "print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())\n"
)


def test_a_running_container_survives_a_snapshotter_restart(node: Node, pulled: dict, tmp_path: Path) -> None:
    import select

    shared = tmp_path / "x"
    shared.mkdir()
    os.mkfifo(shared / "go")
    os.mkfifo(shared / "ready")
    ready = os.open(shared / "ready", os.O_RDONLY | os.O_NONBLOCK)
    unread = _far_unfilled_stdlib_file(node.store)
    proc = subprocess.Popen(
        ["ctr-remote", "--address", str(node.sock), "--namespace", NAMESPACE, "run", "--rm",
         "--snapshotter", SNAPSHOTTER, "--runc-binary", str(LAZYSHIM_BIN),
         "--mount", f"type=bind,src={shared},dst=/x,options=rbind:rw",
         pulled["ref"], "survivor", "/usr/bin/python3", "-c", SURVIVOR, unread],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        readable, _, _ = select.select([ready], [], [], 120)
        assert readable and os.read(ready, 1) == b"r", "the container never said it was running"
        node.stop_snapshotter()
        node.start_snapshotter()
        node.snapshot_keys()  # containerd has reconnected: later ctr calls are not in its back-off
        go = os.open(shared / "go", os.O_WRONLY | os.O_NONBLOCK)
        os.write(go, b"g")
        os.close(go)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == _sha256(unread)
    finally:
        os.close(ready)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_view_of_lazy_layers_has_complete_verified_files(node: Node, pulled: dict, tmp_path: Path) -> None:
    """No supervisor watches a view's readers: its layers are filled before it is answered."""
    top = next(k for k, s in node.state()["snapshots"].items() if s["layer"] == pulled["layers"][-1])
    node.view("lazy-view", top)
    try:
        from shim import api

        assert api.layers_complete_in(api.open_store(node.store), pulled["layers"]), "a view of unfilled files"
        target = tmp_path / "view"
        target.mkdir()
        cmd = node.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "mounts", str(target), "lazy-view").stdout
        subprocess.run(cmd, shell=True, check=True)
        try:
            assert _sha256(str(target / FILES[1].lstrip("/"))) == _sha256(FILES[1])
        finally:
            subprocess.run(["umount", str(target)], check=True)
    finally:
        node.ctr("snapshots", "--snapshotter", SNAPSHOTTER, "rm", "lazy-view")


def _layer_digests(ref: str) -> list[dict]:
    host, _, name_tag = ref.partition("/")
    name, _, tag = name_tag.rpartition(":")
    return fetch_manifest(host, name, tag)["layers"]


@pytest.mark.parametrize("variant", ["zstdchunked", "podman-zstdchunked"])
def test_rpull_of_zstd_chunked_is_lazy_and_runs(node: Node, pulled: dict, images: dict[str, str],
                                                registry: Registry, variant: str) -> None:
    """Both generations of zstd:chunked: ctr-remote's and podman 4.3's annotations."""
    ref = images[f"python:{variant}"]
    registry.clear_access_log()
    node.ctr("image", "rpull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref)
    for layer in _layer_digests(ref):
        reqs = registry.blob_requests(layer["digest"])
        assert reqs and all(r.status == 206 for r in reqs), f"layer {layer['digest'][:19]}: {reqs}"
    p = node.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, "--runc-binary", str(LAZYSHIM_BIN),
                 ref, f"lazy-{variant}", "/usr/bin/python3", "-c", SCRIPT, FILES[1])
    assert p.stdout.splitlines()[1] == f"{FILES[1]} {_sha256(FILES[1])}"
    node.ctr("image", "rm", "--sync", ref)


def test_a_layer_without_index_is_unpacked_by_containerd(node: Node, pulled: dict, images: dict[str, str],
                                                         registry: Registry) -> None:
    """Without rpull's labels (a plain `ctr image pull`) and without an index, containerd
    downloads and unpacks into our snapshot dirs, as with its overlayfs snapshotter."""
    ref = images["busybox:legacy"]
    registry.clear_access_log()
    node.ctr("image", "pull", "--plain-http", "--snapshotter", SNAPSHOTTER, ref)
    for layer in _layer_digests(ref):
        assert any(r.status == 200 for r in registry.blob_requests(layer["digest"])), "no full GET"
        assert not (node.store / "layers" / layer["digest"].replace(":", "-")).exists()
    assert {s["layer"] for s in node.state()["snapshots"].values() if s["layer"]} == set(pulled["layers"])
    p = node.ctr("run", "--rm", "--snapshotter", SNAPSHOTTER, "--runc-binary", str(LAZYSHIM_BIN),
                 ref, "legacy-run", "/bin/busybox", "cat", "/etc/passwd")
    assert p.stdout.startswith("root:")
    node.ctr("image", "rm", "--sync", ref)


def test_image_removal_frees_snapshots_and_layers(node: Node, pulled: dict) -> None:
    node.ctr("image", "rm", "--sync", pulled["ref"])
    assert node.snapshot_keys() == set()
    assert node.state()["snapshots"] == {}
    assert list((node.snap_root / "snapshots").iterdir()) == []
    assert list((node.store / "layers").iterdir()) == []
    assert node.mounts() == [], "a removed snapshot or layer is still mounted"
