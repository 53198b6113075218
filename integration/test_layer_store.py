"""`lazyshim layer-store`: podman's additional layer store that pulls on lookup.

Real podman 4.3.1 with a private storage.conf naming the FUSE mount, real docker-registry,
real runc under lazyshim: a plain `podman pull` of an eStargz image, with no `lazyshim
pull` before it, moves footers and TOCs only; the container runs and reads the image's
bytes; `podman save` has the registry's layers; hostile names are ENOENT."""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from integration.images import fetch_manifest
from integration.podman_env import private_podman, saved_layer_diff_ids
from integration.procs import stop_group, wait_for_line
from integration.registry import Registry
from integration.storeview import release_store_mounts_below
from integration.test_lazy_run import LAZYSHIM as LAZYSHIM_PY
from integration.test_lazy_run import lazyshim
from integration.test_runtime_cli import RANDOM_SHA, RUN_FLAGS, sh
from integration.test_store_layouts import image_digests

# Files the container hashes: the interpreter's own modules, read through the lazy tree.
HASHED = ["usr/lib/python3.11/os.py", "usr/lib/python3.11/json/decoder.py", "usr/lib/python3.11/hashlib.py"]


def _manifest(ref: str) -> dict:
    host, _, rest = ref.partition("/")
    name, _, tag = rest.rpartition(":")
    return fetch_manifest(host, name, tag)


class LayerStore:
    def __init__(self, top: Path) -> None:
        self.store = top / "store"
        self.mnt = top / "mnt"
        self.log = top / "layer-store.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> LayerStore:
        self.mnt.mkdir(exist_ok=True)
        env = dict(os.environ, LAZYSHIM_ROOT=str(self.store))
        offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([*LAZYSHIM_PY, "layer-store", "--mountpoint", str(self.mnt)], env=env,
                                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        wait_for_line(self.log, "layer-store serving", self.proc, "lazyshim layer-store", offset)
        assert os.path.ismount(self.mnt)
        return self

    def stop(self) -> int | None:
        stop_group(self.proc, 30)
        return None if self.proc is None else self.proc.returncode

    def path(self, ref: str, *rest: str) -> Path:
        return self.mnt.joinpath(base64.standard_b64encode(ref.encode()).decode(), *rest)


@pytest.fixture
def layer_store() -> Iterator[LayerStore]:
    top = Path(tempfile.mkdtemp(prefix="lzals-"))
    ls = LayerStore(top).start()
    yield ls
    ls.stop()
    subprocess.run(["umount", "-l", str(ls.mnt)], capture_output=True)  # only if the store failed to
    release_store_mounts_below(top)
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def podman(layer_store: LayerStore) -> Iterator[tuple[list[str], dict[str, str]]]:
    """A private podman whose storage.conf names the FUSE layer store (roots from the conf
    only: podman drops [storage.options] when --root/--runroot are on its command line)."""
    with private_podman(layer_store.mnt, "lzq-") as pod:
        yield pod


def _toc_requests(registry: Registry, ref: str, layer: dict) -> int:
    """How many range requests a pull makes for an eStargz layer's footer and TOC: one for the
    blob's tail, and one more when the TOC begins before that tail."""
    from shim.formats import estargz
    from shim.pull import tail_size

    repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
    blob = registry.blob_path(repo, layer["digest"]).read_bytes()
    toc_offset, _ = estargz.parse_footer(blob[-estargz.FOOTER_SIZE:])
    return 1 if toc_offset >= len(blob) - tail_size(len(blob)) else 2


def test_podman_pull_is_lazy_without_lazyshim_pull_and_runs(
        layer_store: LayerStore, podman, images: dict[str, str], registry: Registry) -> None:
    ref = images["python:esgz"]
    podman_argv, env = podman
    layers = _manifest(ref)["layers"]
    registry.clear_access_log()
    pulled = sh(*podman_argv, "pull", "--tls-verify=false", ref, env=env, timeout=300)
    assert pulled.returncode == 0, pulled.stderr
    for la in layers:  # footer + TOC: one tail range (two if the TOC outgrows it), no whole blob (206)
        n = _toc_requests(registry, ref, la)
        registry.bytes_served(la["digest"], min_requests=n)
        assert [e.status for e in registry.blob_requests(la["digest"])] == [206] * n, la["digest"][:19]
    for la in layers:
        served = registry.bytes_served(la["digest"])
        assert 0 < served < la["size"] * 0.5, (la["digest"][:19], served, la["size"])
    assert (layer_store.store / "layers").is_dir() and len(list((layer_store.store / "layers").iterdir())) == len(
        layers)

    want = image_digests(layer_store.store)
    files = [f for f in HASHED if f in want]
    assert len(files) == len(HASHED), sorted(want)[:20]
    script = ("import hashlib,sys;print('hi from the layer store');"
              "[print(f, hashlib.sha256(open('/' + f,'rb').read()).hexdigest()) for f in sys.argv[1:]]")
    p = sh(*podman_argv, *RUN_FLAGS, "--annotation", "run.lazyshim.background-fetch=none", ref,
           "python3", "-c", script, *files, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "hi from the layer store"
    assert {f: "sha256:" + h for f, h in (line.split() for line in lines[1:])} == {f: want[f] for f in files}
    served = sum(registry.bytes_served(la["digest"]) for la in layers)
    total = sum(la["size"] for la in layers)
    assert served < total * 0.8, f"fetched {served} of {total} bytes"


def test_podman_save_of_a_layer_store_image_has_the_registrys_layers(
        layer_store: LayerStore, podman, images: dict[str, str], registry: Registry, tmp_path: Path) -> None:
    """podman saves a layer from the store's `blob` (the registry's blob, fetched whole and
    verified when podman opens it): it decompresses it, checks it against the layer's
    diff_id as it copies (a wrong byte fails the save) and compresses it again."""
    ref = images["busybox:esgz"]
    podman_argv, env = podman
    assert sh(*podman_argv, "pull", "--tls-verify=false", ref, env=env).returncode == 0
    manifest = _manifest(ref)
    repo = ref.split("/", 1)[1].rsplit(":", 1)[0]
    registry_layers = [la["digest"] for la in manifest["layers"]]
    assert not any(registry.blob_requests(d) and any(e.status == 200 for e in registry.blob_requests(d))
                   for d in registry_layers)  # the pull fetched no whole blob
    out = tmp_path / "image.tar"
    p = sh(*podman_argv, "save", "--format", "oci-archive", "-o", str(out), ref, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    config = json.loads(registry.blob_path(repo, manifest["config"]["digest"]).read_bytes())
    # podman recompresses what it saves: its layers unpack to the registry's diff_ids
    assert saved_layer_diff_ids(out) == config["rootfs"]["diff_ids"]
    for digest in registry_layers:  # what the layer store's `blob` gave podman: the registry's blob
        kept = layer_store.store / "blobs" / digest.replace(":", "-", 1)
        assert kept.read_bytes() == registry.blob_path(repo, digest).read_bytes()


def test_gc_keeps_the_layers_podman_holds_and_frees_them_after_rmi(
        layer_store: LayerStore, podman, images: dict[str, str]) -> None:
    ref = images["busybox:esgz"]
    podman_argv, env = podman
    assert sh(*podman_argv, "pull", "--tls-verify=false", ref, env=env).returncode == 0
    layers = sorted(p.name for p in (layer_store.store / "layers").iterdir())
    assert len(layers) == len(_manifest(ref)["layers"])
    lazyshim(layer_store.store, "gc")
    assert sorted(p.name for p in (layer_store.store / "layers").iterdir()) == layers  # podman holds them
    assert sh(*podman_argv, "rmi", ref, env=env).returncode == 0
    lazyshim(layer_store.store, "gc")
    assert not list((layer_store.store / "layers").iterdir())


def test_lookups_at_once_pull_a_layer_once(layer_store: LayerStore, images: dict[str, str],
                                           registry: Registry) -> None:
    ref = images["busybox:esgz"]
    layer = _manifest(ref)["layers"][-1]
    registry.clear_access_log()

    def look(name: str) -> bytes:
        p = layer_store.path(ref, layer["digest"], name)
        return os.fsencode(os.readlink(p)) if name == "diff" else p.read_bytes()

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(look, ["info", "diff"] * 8))
    assert len(set(got[0::2])) == 1 and len(set(got[1::2])) == 1
    n = _toc_requests(registry, ref, layer)
    registry.bytes_served(layer["digest"], min_requests=n)
    assert [e.status for e in registry.blob_requests(layer["digest"])] == [206] * n  # footer and TOC, once


def test_hostile_and_unknown_names_are_enoent(layer_store: LayerStore, images: dict[str, str]) -> None:
    ref = images["busybox:esgz"]
    digest = _manifest(ref)["layers"][0]["digest"]
    good = base64.standard_b64encode(ref.encode()).decode()
    hostile = [
        layer_store.mnt / "not base64!" / digest / "diff",
        layer_store.mnt / base64.standard_b64encode(b"../../etc").decode() / digest / "info",
        layer_store.mnt / good / "sha256:../../etc" / "info",
        layer_store.mnt / good / ("sha256:" + "g" * 64) / "diff",
        layer_store.mnt / good / digest / "passwd",
        layer_store.mnt / good / ("sha256:" + "0" * 64) / "info",  # no such layer in the manifest
    ]
    for p in hostile:
        with pytest.raises(OSError) as e:
            os.stat(p, follow_symlinks=False)
        assert e.value.errno == errno.ENOENT, (p, e.value)
    assert layer_store.path(ref, digest, "diff").is_symlink()  # the good name next to them works
    assert json.loads(layer_store.path(ref, digest, "info").read_text())["compressed-diff-digest"] == digest
    log = layer_store.log.read_text()
    assert "Traceback" not in log, log


def test_an_unreachable_registry_is_eio_and_one_line(layer_store: LayerStore) -> None:
    ref = "127.0.0.1:1/nothing:here"
    with pytest.raises(OSError) as e:
        os.stat(layer_store.path(ref, "sha256:" + "0" * 64, "info"))
    assert e.value.errno == errno.EIO
    lines = [line for line in layer_store.log.read_text().splitlines() if ref in line]
    assert len(lines) == 1 and lines[0].startswith("lazyshim: layer-store: "), lines
    assert "Traceback" not in layer_store.log.read_text()


def test_bad_mount_points_are_one_line(layer_store: LayerStore, tmp_path: Path) -> None:
    env = dict(os.environ, LAZYSHIM_ROOT=str(layer_store.store))
    for where, says in ((tmp_path / "absent", "is not a directory"),
                        (layer_store.mnt, "another layer store serves")):
        p = subprocess.run([*LAZYSHIM_PY, "layer-store", "--mountpoint", str(where)], env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and p.stderr.count("\n") == 1 and says in p.stderr, p.stderr
    assert os.path.ismount(layer_store.mnt)  # the one serving is untouched


def test_non_lazy_layers_are_left_to_podman(layer_store: LayerStore, images: dict[str, str]) -> None:
    ref = images["busybox:legacy"]
    digest = _manifest(ref)["layers"][0]["digest"]
    with pytest.raises(FileNotFoundError):
        os.stat(layer_store.path(ref, digest, "diff"), follow_symlinks=False)
    assert not (layer_store.store / "layers").is_dir() or not list((layer_store.store / "layers").iterdir())


@pytest.mark.parametrize("variant", ["zstdchunked", "podman-zstdchunked"])
def test_podman_pull_of_zstd_chunked_is_lazy_and_runs(
        layer_store: LayerStore, podman, images: dict[str, str], registry: Registry, variant: str) -> None:
    ref = images[f"busybox:{variant}"]
    podman_argv, env = podman
    layers = _manifest(ref)["layers"]
    registry.clear_access_log()
    assert sh(*podman_argv, "pull", "--tls-verify=false", ref, env=env).returncode == 0
    assert all(e.status == 206 for la in layers for e in registry.blob_requests(la["digest"]))
    assert all(registry.bytes_served(la["digest"]) < la["size"] * 0.5 for la in layers)
    p = sh(*podman_argv, *RUN_FLAGS, "--annotation", "run.lazyshim.background-fetch=none", ref,
           "sha256sum", "/app/random.bin", env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0] == RANDOM_SHA


def test_a_killed_store_restarts_on_its_mount_and_serves_from_the_store(
        layer_store: LayerStore, images: dict[str, str], registry: Registry) -> None:
    ref = images["busybox:esgz"]
    digest = _manifest(ref)["layers"][-1]["digest"]
    info = layer_store.path(ref, digest, "info").read_text()
    assert layer_store.proc is not None
    os.killpg(layer_store.proc.pid, signal.SIGKILL)
    layer_store.proc.wait()
    assert f" {layer_store.mnt} " in Path("/proc/self/mountinfo").read_text()  # what a crash leaves: a dead mount
    registry.clear_access_log()
    layer_store.start()
    assert layer_store.path(ref, digest, "info").read_text() == info
    assert os.readlink(layer_store.path(ref, digest, "diff"))
    assert registry.access_log() == []  # from the store, not the registry


def test_sigterm_unmounts(layer_store: LayerStore) -> None:
    assert layer_store.stop() == 0
    assert not os.path.ismount(layer_store.mnt)
