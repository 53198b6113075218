"""End to end as the kubelet drives a node: containerd 1.6's CRI plugin, with `lazyshim snapshotter`
as its snapshotter and `lazyshim` as the `lazyshim` runtime handler, pulls the python eStargz
image lazily and runs it in a host-network pod; the real registry's access log says what moved,
`lazyshim stats` what the supervisor filled, the CRI log file what the container printed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from integration import cri
from integration.images import Entry, ImageSpec, build_and_push, fetch_manifest, register_spec
from integration.procs import stop_group, wait_for_socket
from integration.registry import Registry
from integration.storeview import release_store_mounts_below

LAZYSHIM_BIN = Path(sys.executable).parent / "lazyshim"
SNAPSHOTTER = "lazyshim"
HANDLER = "lazyshim"
CRI_PLUGIN = 'plugins."io.containerd.grpc.v1.cri"'
MAX_PULL_SHARE = 0.15  # of the layer bytes a lazy PullImage may move
DEADLINE = 180.0       # seconds any one state change may take on a loaded machine


def pause_spec() -> ImageSpec:
    """The sandbox image: busybox's `sleep`, built here (no registry on the internet)."""
    return ImageSpec("pause", [[Entry("bin", "dir", 0o755), Entry("bin/busybox", "file", 0o755,
                                                                   source=Path("/bin/busybox")),
                                Entry("bin/sleep", "symlink", 0o777, linkname="busybox")]],
                     cmd=["/bin/sleep", "2147483647"], env=["PATH=/bin"])


def containerd_config(root: Path, state: Path, sock: Path, snap_sock: Path, cni: Path, registry: str,
                      sandbox_image: str) -> str:
    """containerd 1.6 with its CRI plugin: the README's node set-up, private paths, loopback registry."""
    disabled = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
                "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]
    runtimes = "".join(
        f'[{CRI_PLUGIN}.containerd.runtimes.{name}]\n  runtime_type = "io.containerd.runc.v2"\n'
        f'[{CRI_PLUGIN}.containerd.runtimes.{name}.options]\n  BinaryName = "{LAZYSHIM_BIN}"\n'
        for name in ("runc", HANDLER))
    return (
        "version = 2\n"
        f'root = "{root}"\nstate = "{state}"\n'
        f"disabled_plugins = {json.dumps(disabled)}\n"
        f'[grpc]\n  address = "{sock}"\n'
        f'[ttrpc]\n  address = "{sock}.ttrpc"\n'
        '[debug]\n  address = ""\n'
        '[metrics]\n  address = ""\n'
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{root}/opt"\n'
        f'[proxy_plugins.{SNAPSHOTTER}]\n  type = "snapshot"\n  address = "{snap_sock}"\n'
        f"[{CRI_PLUGIN}]\n"
        f'  sandbox_image = "{sandbox_image}"\n'
        "  restrict_oom_score_adj = true\n"  # no CAP_SYS_RESOURCE here: see MACHINE.md
        '  stream_server_address = "127.0.0.1"\n  stream_server_port = "0"\n'
        f"[{CRI_PLUGIN}.containerd]\n"
        f'  snapshotter = "{SNAPSHOTTER}"\n'
        "  disable_snapshot_annotations = false\n"
        '  default_runtime_name = "runc"\n'
        + runtimes
        + f'[{CRI_PLUGIN}.cni]\n  bin_dir = "{cni}"\n  conf_dir = "{cni}"\n'
        f'[{CRI_PLUGIN}.registry.mirrors."{registry}"]\n  endpoint = ["http://{registry}"]\n'
    )


@dataclass
class Node:
    """A containerd with CRI and our proxy snapshotter, each with its own root, state and socket;
    `run` is the lazyshim runtime dir (short: a 64-hex CRI container id goes under it)."""

    dir: Path
    run: Path
    snapshotter: subprocess.Popen | None = None
    containerd: subprocess.Popen | None = None

    @property
    def sock(self) -> Path:
        return self.dir / "containerd.sock"

    @property
    def store(self) -> Path:
        return self.dir / "store"

    @property
    def env(self) -> dict[str, str]:
        """lazyshim's environment: containerd passes its own to the runtime binary."""
        return dict(os.environ, LAZYSHIM_RUNTIME_DIR=str(self.run), LAZYSHIM_ROOT=str(self.dir / "not-this-store"))

    def start(self, registry: str, sandbox_image: str) -> None:
        snap_sock, log = self.dir / "snapshotter.sock", self.dir / "snapshotter.log"
        with open(log, "ab") as f:
            self.snapshotter = subprocess.Popen(
                [str(LAZYSHIM_BIN), "snapshotter", "--address", str(snap_sock), "--root", str(self.dir / "snapshots"),
                 "--store", str(self.store)],
                env=self.env, stdin=subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True)
        wait_for_socket(snap_sock, self.snapshotter, log, "lazyshim snapshotter")
        cni = self.dir / "cni"
        cni.mkdir()
        cfg = self.dir / "containerd.toml"
        cfg.write_text(containerd_config(self.dir / "root", self.dir / "state", self.sock, snap_sock, cni, registry,
                                         sandbox_image))
        log = self.dir / "containerd.log"
        with open(log, "ab") as f:
            self.containerd = subprocess.Popen(["containerd", "--config", str(cfg)], env=self.env,
                                               stdin=subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True)
        wait_for_socket(self.sock, self.containerd, log, "containerd")

    def _mount_points(self) -> list[str]:
        """Mount points under this node's dirs, from the kernel's own table."""
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        return [p for p in points if p.startswith((f"{self.dir}/", f"{self.run}/"))]

    def _store_own(self) -> str:
        """Where the store mounts for itself (v2: its metadata tmpfs, with a read-only view per
        layer that lasts as long as the layer does); no pod or container mounts there."""
        from shim.store.layout import Store
        from shim.store.layouts import view_root

        return os.path.realpath(view_root(Store(self.store)))

    def mounts(self) -> list[str]:
        """Mounts under this node's dirs but for the store's own: pods' and containers' mounts."""
        own = self._store_own()
        return [p for p in self._mount_points() if p != own and not p.startswith(f"{own}/")]

    def layer_views(self) -> list[str]:
        """The store's own mounts of its layers (v2's read-only views; gone with their layers)."""
        own = self._store_own()
        return [p for p in self._mount_points() if p.startswith(f"{own}/")]

    def lazyshim(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(LAZYSHIM_BIN), *args], env=self.env, capture_output=True, text=True, timeout=60)

    def stop(self) -> None:
        stop_group(self.containerd, 20)
        stop_group(self.snapshotter, 20)


@pytest.fixture(scope="module")
def pause(registry: Registry, images: dict[str, str]) -> str:
    register_spec("pause", pause_spec)
    return build_and_push(registry, names=["pause"], variants=["legacy"])["pause:legacy"]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, registry: Registry, pause: str) -> Iterator[Node]:
    run = Path(tempfile.mkdtemp(prefix="lzcri-"))
    n = Node(dir=tmp_path_factory.mktemp("crinode"), run=run)
    try:
        n.start(registry.host, pause)
        yield n
    finally:
        n.stop()
        shutil.rmtree(run, ignore_errors=True)
        release_store_mounts_below(n.dir)  # the store's metadata tmpfs (layout v2), before the dir goes


@pytest.fixture(scope="module")
def client(node: Node) -> Iterator[cri.CRIClient]:
    with cri.CRIClient(str(node.sock)) as c:
        yield c


def test_version_is_cri_v1(client: cri.CRIClient) -> None:
    v = client.call("Version", version="v1")
    assert v.runtime_name == "containerd"
    assert v.runtime_api_version == "v1"


@pytest.fixture(scope="module")
def pulled(client: cri.CRIClient, images: dict[str, str], registry: Registry) -> dict:
    """PullImage of the python eStargz image, as the kubelet asks; what the registry served."""
    ref = images["python:esgz"]
    host, _, name_tag = ref.partition("/")
    name, _, tag = name_tag.rpartition(":")
    layers = fetch_manifest(host, name, tag)["layers"]
    registry.clear_access_log()
    image_id = client.call("PullImage", image={"image": ref}).image_ref
    requests = {layer["digest"]: registry.blob_requests(layer["digest"]) for layer in layers}
    return {"ref": ref, "image_id": image_id, "layers": layers, "requests": requests}


def test_pull_image_moves_only_footers_and_tocs(client: cri.CRIClient, pulled: dict, node: Node) -> None:
    assert pulled["image_id"].startswith("sha256:")
    status = client.call("ImageStatus", image={"image": pulled["ref"]}).image
    assert status.id == pulled["image_id"] and pulled["ref"] in status.repo_tags
    for layer in pulled["layers"]:
        reqs = pulled["requests"][layer["digest"]]
        assert reqs and all(r.status == 206 for r in reqs), f"layer {layer['digest'][:19]}: a full GET: {reqs}"
    moved = sum(r.size for reqs in pulled["requests"].values() for r in reqs)
    total = sum(layer["size"] for layer in pulled["layers"])
    assert moved < MAX_PULL_SHARE * total, f"PullImage moved {moved} of {total} layer bytes"
    from shim import api

    store = api.open_store(node.store)
    for layer in pulled["layers"]:
        assert api.layer_lowerdir(store, layer["digest"]).is_dir()  # built lazily: containerd unpacked nothing


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# Prints, hashes what it is given, then says "ready" through a FIFO and waits for "go", so that the
# test can ask its supervisor for its counts while it runs.
SCRIPT = (
    "import hashlib, os, select, sys\n"
    "print('hello from a CRI pod', flush=True)\n"
    "for p in sys.argv[1:]:\n"
    "    print(p, hashlib.sha256(open(p, 'rb').read()).hexdigest(), flush=True)\n"
    "g = os.open('/x/go', os.O_RDONLY | os.O_NONBLOCK)\n"
    "r = os.open('/x/ready', os.O_WRONLY)\n"
    "os.write(r, b'r'); os.close(r)\n"
    "select.select([g], [], [])\n"
    "print('bye', flush=True)\n"
)
FILES = ["/usr/bin/python3.11", "/usr/lib/python3.11/json/decoder.py"]
NODE_NET = {"network": cri.NODE, "pid": cri.CONTAINER, "ipc": cri.POD}


def _wait_state(client: cri.CRIClient, container_id: str, state: int) -> object:
    """ContainerStatus once it reports `state` (polled, bounded by DEADLINE)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        status = client.call("ContainerStatus", container_id=container_id).status
        if status.state == state:
            return status
        if status.state == cri.CONTAINER_EXITED or time.monotonic() > deadline:
            pytest.fail(f"container {container_id[:12]}: state {status.state} ({status.reason}: {status.message}), "
                        f"not {state}")
        time.sleep(0.1)


@contextlib.contextmanager
def _pod(client: cri.CRIClient, node: Node, name: str) -> Iterator[tuple[str, dict]]:
    """A host-network pod under the lazyshim handler, as the kubelet asks for one; stopped and
    removed at the end, and then no mount of it may be left."""
    uid = uuid.uuid4().hex
    logs = node.dir / "pods" / uid
    logs.mkdir(parents=True)
    sandbox = {"metadata": {"name": name, "uid": uid, "namespace": "default"}, "log_directory": str(logs),
               "linux": {"security_context": {"namespace_options": NODE_NET}}}
    pod = client.call("RunPodSandbox", config=sandbox, runtime_handler=HANDLER).pod_sandbox_id
    try:
        st = client.call("PodSandboxStatus", pod_sandbox_id=pod).status
        assert st.state == cri.SANDBOX_READY and st.runtime_handler == HANDLER
        yield pod, sandbox
    finally:
        client.call("StopPodSandbox", pod_sandbox_id=pod)
        client.call("RemovePodSandbox", pod_sandbox_id=pod)
    assert node.mounts() == [], "a removed pod left mounts behind"


def _container(pulled: dict, name: str, args: list[str], **security: object) -> dict:
    return {"metadata": {"name": name}, "image": {"image": pulled["image_id"]}, "command": ["/usr/bin/python3"],
            "args": args, "log_path": f"{name}/0.log",
            "linux": {"security_context": {"namespace_options": NODE_NET, **security}}}


def _stdout(status) -> list[str]:
    return [line for stream, line in cri.parse_log(Path(status.log_path).read_text()) if stream == "stdout"]


def test_pod_runs_lazily_through_the_lazyshim_handler(client: cri.CRIClient, node: Node, pulled: dict,
                                                      tmp_path: Path) -> None:
    shared = tmp_path / "x"
    shared.mkdir()
    os.mkfifo(shared / "go")
    os.mkfifo(shared / "ready")
    with _pod(client, node, "lazy-pod") as (pod, sandbox):
        config = _container(pulled, "py", ["-c", SCRIPT, *FILES])
        config["mounts"] = [{"container_path": "/x", "host_path": str(shared)}]
        (Path(sandbox["log_directory"]) / "py").mkdir()
        ready = os.open(shared / "ready", os.O_RDONLY | os.O_NONBLOCK)
        try:
            cid = client.call("CreateContainer", pod_sandbox_id=pod, config=config,
                              sandbox_config=sandbox).container_id
            client.call("StartContainer", container_id=cid)
            readable, _, _ = select.select([ready], [], [], DEADLINE)
            assert readable and os.read(ready, 1) == b"r", "the container never said it was running"
            p = node.lazyshim("stats", cid)
            assert p.returncode == 0, f"lazyshim stats: {p.stderr.strip()}"
            stats = json.loads(p.stdout)
            assert stats["fills"] > 0 and stats["files_filled"] > 0, f"nothing filled: {stats}"
            go = os.open(shared / "go", os.O_WRONLY | os.O_NONBLOCK)
            os.write(go, b"g")
            os.close(go)
            status = _wait_state(client, cid, cri.CONTAINER_EXITED)
        finally:
            os.close(ready)
        assert status.exit_code == 0, f"exit {status.exit_code}: {status.reason} {status.message}"
        out = _stdout(status)
        assert out[0] == "hello from a CRI pod" and out[-1] == "bye", out
        assert dict(line.split() for line in out[1:-1]) == {f: _sha256(f) for f in FILES}
        client.call("RemoveContainer", container_id=cid)


def test_a_user_named_in_the_image_is_resolved(client: cri.CRIClient, node: Node, pulled: dict) -> None:
    """containerd looks `run_as_username` up in the snapshot's /etc/passwd itself, through a
    temporary mount no supervisor watches: the snapshotter has those files filled."""
    with _pod(client, node, "user-pod") as (pod, sandbox):
        config = _container(pulled, "user", ["-c", "import os; print(os.getuid(), os.getgid())"],
                            run_as_username="nobody")
        (Path(sandbox["log_directory"]) / "user").mkdir()
        cid = client.call("CreateContainer", pod_sandbox_id=pod, config=config, sandbox_config=sandbox).container_id
        client.call("StartContainer", container_id=cid)
        status = _wait_state(client, cid, cri.CONTAINER_EXITED)
        assert status.exit_code == 0, f"exit {status.exit_code}: {status.reason} {status.message}"
        assert _stdout(status) == ["65534 65534"]
        client.call("RemoveContainer", container_id=cid)


def test_remove_image_frees_its_layers(client: cri.CRIClient, node: Node, pulled: dict) -> None:
    client.call("RemoveImage", image={"image": pulled["image_id"]})
    assert not client.call("ImageStatus", image={"image": pulled["ref"]}).HasField("image")
    from shim import api
    from shim.errors import LazyshimError

    store = api.open_store(node.store)
    for layer in pulled["layers"]:
        with pytest.raises(LazyshimError):
            api.layer_lowerdir(store, layer["digest"])
    assert node.mounts() == []
    assert node.layer_views() == [], "a removed layer's view is still mounted"
