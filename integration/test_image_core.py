"""The image core against real components: a real registry, umoci, podman, and our CLI.

* fidelity: after `lazyshim pull` + `lazyshim fetch`, the layer trees stacked by a real
  read-only overlay mount equal what `umoci unpack` makes of the legacy image (content,
  modes, owners, symlinks, hardlinks, xattrs, mtimes, whiteouts);
* corruption: a flipped byte in the registry's blob fails the fetch with one line and
  leaves the file unfilled and without data;
* hostile layers are refused at pull time and leave nothing in the store;
* concurrency, a dead or hung registry, garbage collection, `images` / `inspect`;
* `lazyshim convert` output is read lazily by us and pulled and run by podman.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.images import PrivateEnv, skopeo_copy
from integration.registry import Registry
from integration.storeview import file_filled, has_data, image_mount, layout_name, overlay_options
from integration.treecmp import diff, snapshot
from shim.formats import estargz
from shim.formats.estargz_writer import build_estargz, tar_header, tar_padding
from shim.registry.client import RegistryClient
from shim.store.layout import Store
from shim.store.layouts import MountSpec, load_meta

LAZYSHIM = [sys.executable, "-m", "runtime.main"]
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MTIME = 1_600_000_000


def lazyshim(store: Path, *args: str, check: bool = True, timeout: float = 120,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, LAZYSHIM_ROOT=str(store), **(env or {}))
    p = subprocess.run(LAZYSHIM + list(args), env=e, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"lazyshim {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


PROGRESS_LINE = re.compile(r"layer \d+/\d+ ")  # pull's and fetch's per-layer progress on stderr


def assert_one_line_failure(p: subprocess.CompletedProcess, *words: str, code: int = 1) -> str:
    """One line of error, after any progress lines of the layers done before it; `code` is
    the exit status (125 for `lazyshim run`'s own errors, as podman's)."""
    err = "\n".join(line for line in p.stderr.strip().splitlines() if not PROGRESS_LINE.match(line))
    assert p.returncode == code, f"exit {p.returncode}: {err}"
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert any(w in err.lower() for w in words), err
    return err


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture(params=["v1", "v2"])
def store_layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with a store of each layout (fidelity and hostile input must hold for both)."""
    monkeypatch.setenv("LAZYSHIM_STORE_LAYOUT", request.param)
    return request.param


def layer_dirs(store: Path) -> list[Path]:
    d = store / "layers"
    return sorted(d.iterdir()) if d.is_dir() else []


@contextlib.contextmanager
def overlay(spec: MountSpec, target: Path) -> Iterator[Path]:
    """A read-only overlay of an image's trees (no upper dir), as the runtime stacks them."""
    target.mkdir(parents=True, exist_ok=True)
    if len(spec.lowers) == 1 and not spec.data_lowers:  # overlayfs wants two lowers without an upper
        (target.parent / "empty-lower").mkdir(exist_ok=True)
        spec = MountSpec([*spec.lowers, target.parent / "empty-lower"])
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", overlay_options(spec), str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def image_trees(store: Path, ref: str) -> MountSpec:
    return image_mount(store, ref)


# ------------------------------------------------------------------ hand-made images


def push_image(host: str, repo: str, tag: str, layers: list[tuple[bytes, str, dict, str]],
               layout: Path | None = None) -> str:
    """Push (blob, media type, annotations, diff_id) layers with a minimal config; optionally
    also write the same image as an OCI layout at `layout`."""
    config = {
        "architecture": "amd64", "os": "linux", "created": "2020-09-13T12:26:40Z",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [d for _, _, _, d in layers]},
        "history": [{"created_by": f"test layer {i}"} for i in range(len(layers))],
    }
    config_raw = json.dumps(config).encode()
    blobs = {_sha(config_raw): config_raw}
    descs = []
    for blob, mt, ann, _ in layers:
        blobs[_sha(blob)] = blob
        d = {"mediaType": mt, "digest": _sha(blob), "size": len(blob)}
        if ann:
            d["annotations"] = ann
        descs.append(d)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": _sha(config_raw), "size": len(config_raw)},
        "layers": descs,
    }).encode()
    with RegistryClient(host) as c:
        for digest, data in blobs.items():
            c.push_blob(repo, digest, data)
        c.push_manifest(repo, tag, manifest, MT_MANIFEST)
    if layout is not None:
        (layout / "blobs" / "sha256").mkdir(parents=True)
        for digest, data in [*blobs.items(), (_sha(manifest), manifest)]:
            (layout / "blobs" / "sha256" / digest.split(":")[1]).write_bytes(data)
        (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
            "mediaType": MT_MANIFEST, "digest": _sha(manifest), "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return f"{host}/{repo}:{tag}"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _ti(name: str, typ: bytes = tarfile.REGTYPE, **kw) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = typ
    ti.mode = kw.pop("mode", 0o755 if typ == tarfile.DIRTYPE else 0o644)
    ti.mtime = kw.pop("mtime", MTIME)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def rich_layers() -> list[list[tuple[tarfile.TarInfo, bytes | None]]]:
    """Two layers with every kind of entry and metadata an image can carry."""
    big = os.urandom(200_000) + bytes(100_000) + b"tail"  # multi-chunk files: see the busybox tests
    xattr = {"SCHILY.xattr.user.lazyshim": "v1", "SCHILY.xattr.user.empty": ""}
    l1 = [
        (_ti("bin", tarfile.DIRTYPE), None),
        (_ti("bin/tool", mode=0o4755, mtime=MTIME + 1), b"#!/bin/sh\necho tool\n"),
        (_ti("bin/tool-link", tarfile.LNKTYPE, linkname="bin/tool"), None),
        (_ti("bin/rel", tarfile.SYMTYPE, linkname="tool", mode=0o777), None),
        (_ti("bin/abs", tarfile.SYMTYPE, linkname="/etc/owned", mode=0o777), None),
        (_ti("etc", tarfile.DIRTYPE, mode=0o750, uid=0, gid=4), None),
        (_ti("etc/owned", mode=0o640, uid=1000, gid=1001, mtime=MTIME + 2), b"owned\n"),
        (_ti("etc/xattr", pax_headers=xattr), b"with xattrs\n"),
        (_ti("etc/dup"), b"first version\n"),
        (_ti("etc/dup", mode=0o600), b"second version wins\n"),
        (_ti("etc/fifo", tarfile.FIFOTYPE, mode=0o600), None),
        (_ti("etc/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666), None),
        (_ti("data", tarfile.DIRTYPE, mode=0o700, uid=33, gid=33, mtime=MTIME + 3), None),
        (_ti("data/big.bin", uid=33, gid=33), big),
        (_ti("data/empty"), b""),
        (_ti("data/gone"), b"deleted by the upper layer\n"),
        (_ti("opq", tarfile.DIRTYPE), None),
        (_ti("opq/hidden"), b"hidden by the opaque marker\n"),
        (_ti("sticky", tarfile.DIRTYPE, mode=0o1777), None),
    ]
    l2 = [
        (_ti("bin", tarfile.DIRTYPE), None),
        (_ti("bin/tool", mode=0o755, mtime=MTIME + 10), b"#!/bin/sh\necho tool v2\n"),
        (_ti("data", tarfile.DIRTYPE, mode=0o700, uid=33, gid=33, mtime=MTIME + 3), None),
        (_ti("data/.wh.gone"), b""),
        (_ti("opq", tarfile.DIRTYPE, mtime=MTIME + 4), None),
        (_ti("opq/.wh..wh..opq"), b""),
        (_ti("opq/new"), b"the only file left in opq\n"),
        (_ti("new-dir", tarfile.DIRTYPE, mode=0o711), None),
        (_ti("new-dir/a"), b"a\n"),
        (_ti("new-dir/b", tarfile.LNKTYPE, linkname="new-dir/a"), None),
    ]
    return [l1, l2]


def legacy_blob(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> tuple[bytes, str]:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in entries:
            ti.size = len(data or b"")
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    tar = buf.getvalue()
    return gzip.compress(tar, mtime=0), _sha(tar)


def umoci_unpack(layout: Path, tag: str, dest: Path) -> Path:
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(dest)], check=True,
                   capture_output=True, timeout=120)
    return dest / "rootfs"


@pytest.fixture(scope="module")
def rich(registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The rich image pushed as legacy gzip and as an OCI layout, and its umoci reference tree."""
    tmp = tmp_path_factory.mktemp("rich")
    layers = [legacy_blob(lay) for lay in rich_layers()]
    ref = push_image(registry.host, "rich", "legacy", [(b, MT_GZIP, {}, d) for b, d in layers],
                     layout=tmp / "layout")
    rootfs = umoci_unpack(tmp / "layout", "legacy", tmp / "umoci")
    return {"ref": ref, "layout": tmp / "layout", "snapshot": snapshot(rootfs)}


@pytest.fixture(scope="module")
def python_reference(registry: Registry, images: dict[str, str],
                     tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple]:
    """What `umoci unpack` makes of python:legacy, as pulled from the registry."""
    tmp = tmp_path_factory.mktemp("pyref")
    skopeo_copy(f"docker://{images['python:legacy']}", f"oci:{tmp / 'layout'}:legacy", PrivateEnv(tmp / "env"))
    return snapshot(umoci_unpack(tmp / "layout", "legacy", tmp / "umoci"))


def fetched_snapshot(store: Path, ref: str, mnt: Path) -> dict[str, tuple]:
    lazyshim(store, "pull", ref)
    lazyshim(store, "fetch", ref)
    with overlay(image_trees(store, ref), mnt) as root:
        return snapshot(root)


# ------------------------------------------------------------------ fidelity


@pytest.mark.parametrize("variant", ["esgz", "zstdchunked", "podman-zstdchunked"])
def test_fetched_python_equals_umoci_unpack(store_layout: str, variant: str, images: dict[str, str], store: Path,
                                            tmp_path: Path, python_reference: dict[str, tuple]) -> None:
    got = fetched_snapshot(store, images[f"python:{variant}"], tmp_path / "mnt")
    assert diff(python_reference, got) == []


@pytest.mark.parametrize("fmt", ["estargz", "zstd:chunked"])
def test_converted_rich_image_equals_umoci_unpack(store_layout: str, fmt: str, rich: dict, registry: Registry,
                                                  store: Path, tmp_path: Path) -> None:
    """Owners, xattrs, devices, fifos, hardlinks, duplicates and whiteouts survive our converter
    and our pull/fetch exactly as umoci reproduces them from the original."""
    dst = f"{registry.host}/rich:conv-{fmt.replace(':', '-')}"
    src = rich["ref"] if fmt == "estargz" else f"oci:{rich['layout']}:legacy"
    lazyshim(store, "convert", src, dst, "--format", fmt)
    got = fetched_snapshot(store, dst, tmp_path / "mnt")
    assert diff(rich["snapshot"], got) == []


def test_pulled_placeholders_have_the_final_metadata_before_fetch(store_layout: str, rich: dict, registry: Registry,
                                                                   store: Path, tmp_path: Path) -> None:
    dst = f"{registry.host}/rich:conv-meta"
    lazyshim(store, "convert", rich["ref"], dst)
    lazyshim(store, "pull", dst)
    with overlay(image_trees(store, dst), tmp_path / "mnt") as root:
        st = os.stat(root / "data/big.bin")
        assert st.st_size == 300_004 and not file_filled(store, "/data/big.bin")
        if layout_name(store) == "v1":
            assert st.st_blocks == 0  # v2 reports the blocks the file will take
        got = {k: v[:4] for k, v in snapshot(root, contents=False).items() if k != "#links"}
    want = {k: v[:4] for k, v in rich["snapshot"].items() if k != "#links"}
    assert got == want  # type, mode, owner: all final before a byte of content arrives


# ------------------------------------------------------------------ corruption


def _entry(store: Path, name: str):
    for d in layer_dirs(store):
        meta = load_meta(Store(store), d.name.replace("-", ":", 1))
        for i, e in enumerate(meta.toc.entries):
            if e.name == name and e.type == "reg":
                return d, meta, i, e
    raise AssertionError(f"{name} not in any layer")


@pytest.mark.parametrize("chunk", [0, -1])
def test_corrupt_blob_fails_fetch_and_fills_nothing_unverified(chunk: int, images: dict[str, str], store: Path,
                                                               registry: Registry) -> None:
    """Flip one byte inside a chunk of app/random.bin (two chunks); the first chunk is valid,
    so with chunk=-1 verified data was written before the bad chunk was seen."""
    ref = images["busybox:esgz"]
    lazyshim(store, "pull", ref)
    layer_dir, meta, idx, e = _entry(store, "app/random.bin")
    assert len(e.chunks) >= 2
    c = e.chunks[chunk]
    path = registry.blob_path("busybox", meta.digest)
    original = path.read_bytes()
    pos = (c.offset + c.end) // 2
    try:
        path.write_bytes(original[:pos] + bytes([original[pos] ^ 0xFF]) + original[pos + 1:])
        p = lazyshim(store, "fetch", ref, check=False)
    finally:
        path.write_bytes(original)
    assert_one_line_failure(p, "digest", "corrupt", "crc")
    assert "random.bin" in p.stderr
    assert (layer_dir / "filled").read_bytes()[idx] == 0
    assert not has_data(store, meta.digest, idx)
    if layout_name(store) == "v1":
        st = os.stat(layer_dir / "tree" / e.name)
        assert st.st_blocks == 0 and st.st_size == e.size
    # The registry serves good bytes again: the same store now fills it correctly.
    lazyshim(store, "fetch", ref)
    assert (layer_dir / "filled").read_bytes()[idx] == 1 and has_data(store, meta.digest, idx)


# ------------------------------------------------------------------ hostile layers


def _retoc(entries, mutate) -> tuple[bytes, dict]:
    """A valid eStargz layer whose TOC JSON is then changed by `mutate(doc)`; the annotation
    carries the digest of the changed TOC, so only the content check can object."""
    lay = build_estargz(entries)
    toc_off, _ = estargz.parse_footer(lay.blob[-estargz.FOOTER_SIZE:])
    doc = json.loads(lay.toc_json)
    mutate(doc)
    toc_json = json.dumps(doc).encode()
    blob = lay.blob[:toc_off] + _toc_member(toc_json) + estargz.footer_bytes(toc_off)
    return blob, {estargz.TOC_DIGEST_ANNOTATION: _sha(toc_json)}


def _toc_member(payload: bytes, name: str = "stargz.index.json") -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = len(payload)
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    return z.compress(tar_header(ti) + payload + tar_padding(len(payload)) + bytes(1024)) + z.flush()


def _simple() -> list:
    return [(_ti("d", tarfile.DIRTYPE), None), (_ti("d/f"), b"content\n"), (_ti("l", tarfile.SYMTYPE,
            linkname="/etc", mode=0o777), None)]


def _hostile_dotdot():
    def m(doc):
        doc["entries"][1]["name"] = "d/../../escape"
    return _retoc(_simple(), m)


def _hostile_below_symlink():
    def m(doc):
        doc["entries"].append({"name": "l/passwd", "type": "reg", "mode": 420})
    return _retoc(_simple(), m)


def _hostile_toc_digest():
    lay = build_estargz(_simple())
    return lay.blob, {estargz.TOC_DIGEST_ANNOTATION: _sha(b"some other toc")}


def _hostile_footer_outside():
    lay = build_estargz(_simple())
    blob = lay.blob[:-estargz.FOOTER_SIZE] + estargz.footer_bytes(len(lay.blob) * 1000)
    return blob, {estargz.TOC_DIGEST_ANNOTATION: lay.toc_digest}


def _hostile_gzip_bomb():
    lay = build_estargz(_simple())
    toc_off, _ = estargz.parse_footer(lay.blob[-estargz.FOOTER_SIZE:])
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    bomb = (z.compress(bytes(1 << 20)) + z.flush()) * 300  # 300 MiB of zeros in ~300 kB of members
    blob = lay.blob[:toc_off] + bomb + estargz.footer_bytes(toc_off)
    return blob, {estargz.TOC_DIGEST_ANNOTATION: lay.toc_digest}


def _hostile_chunk_outside():
    def m(doc):
        doc["entries"][1]["offset"] = 1 << 40
    return _retoc(_simple(), m)


HOSTILE = {
    "dotdot": (_hostile_dotdot, ("escapes",)),
    "below-symlink": (_hostile_below_symlink, ("below symlink",)),
    "toc-digest": (_hostile_toc_digest, ("does not match",)),
    "footer-outside": (_hostile_footer_outside, ("outside",)),
    "gzip-bomb": (_hostile_gzip_bomb, ("inflates beyond",)),
    "chunk-outside": (_hostile_chunk_outside, ("bad offset",)),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_layer_is_refused_and_leaves_nothing(store_layout: str, case: str, registry: Registry,
                                                    images: dict[str, str], store: Path) -> None:
    make, words = HOSTILE[case]
    blob, ann = make()
    ref = push_image(registry.host, "hostile", case, [(blob, MT_GZIP, ann, _sha(b"unused"))])
    t0 = time.monotonic()
    p = lazyshim(store, "pull", ref, check=False)
    assert time.monotonic() - t0 < 15
    assert_one_line_failure(p, *words)
    assert layer_dirs(store) == [], "a refused layer left a layer dir"
    assert list((store / "tmp").iterdir()) == [], "a refused layer left staging behind"
    assert list((store / "images").iterdir()) == []
    # The store still works for a good image.
    lazyshim(store, "pull", images["busybox:esgz"])
    assert len(layer_dirs(store)) == 2


# ------------------------------------------------------------------ concurrency, dead registries


def test_two_concurrent_pulls_share_one_layer_dir_each(images: dict[str, str], store: Path) -> None:
    ref = images["python:esgz"]
    env = dict(os.environ, LAZYSHIM_ROOT=str(store))
    procs = [subprocess.Popen([*LAZYSHIM, "pull", "-q", ref], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]
    assert len(layer_dirs(store)) == 2
    assert list((store / "tmp").iterdir()) == []


@pytest.fixture
def private_registry() -> Iterator[Registry]:
    reg = Registry().start()
    try:
        yield reg
    finally:
        proc = reg._proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGCONT)
        reg.stop()


FAST_FAIL = {"LAZYSHIM_REGISTRY_RETRIES": "1", "LAZYSHIM_REGISTRY_TIMEOUT": "1"}


def test_registry_that_dies_fails_pull_and_fetch_quickly(private_registry: Registry, store: Path) -> None:
    lay = build_estargz([(_ti("f"), os.urandom(100_000))])
    ann = {estargz.TOC_DIGEST_ANNOTATION: lay.toc_digest}
    ref = push_image(private_registry.host, "dies", "v1", [(lay.blob, MT_GZIP, ann, lay.diff_id)])
    push_image(private_registry.host, "dies", "v2", [(lay.blob, MT_GZIP, ann, lay.diff_id)])
    lazyshim(store, "pull", ref)
    private_registry._kill()  # gone mid-test: the pulled image is still unfilled
    t0 = time.monotonic()
    p = lazyshim(store, "fetch", ref, check=False, env=FAST_FAIL)
    assert time.monotonic() - t0 < 15
    assert_one_line_failure(p, "connect", "refused", "unavailable")
    assert (layer_dirs(store)[0] / "filled").read_bytes() == b"\0"
    t0 = time.monotonic()
    p = lazyshim(store, "pull", ref.replace(":v1", ":v2"), check=False, env=FAST_FAIL)
    assert time.monotonic() - t0 < 15
    assert_one_line_failure(p, "connect", "refused", "unavailable")


def test_hung_registry_times_out(private_registry: Registry, store: Path) -> None:
    """A registry that accepts connections but never answers (SIGSTOP) is a timeout, not a hang."""
    lay = build_estargz([(_ti("f"), b"x")])
    ref = push_image(private_registry.host, "hung", "v1",
                     [(lay.blob, MT_GZIP, {estargz.TOC_DIGEST_ANNOTATION: lay.toc_digest}, lay.diff_id)])
    proc = private_registry._proc
    assert proc is not None
    os.killpg(proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        p = lazyshim(store, "pull", ref, check=False, env=FAST_FAIL, timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    assert elapsed < 15
    assert_one_line_failure(p, "timed out", "timeout")
    assert layer_dirs(store) == []


# ------------------------------------------------------------------ rmi, images, inspect


def test_rmi_collects_unused_layers_but_not_mounted_ones(images: dict[str, str], store: Path,
                                                         tmp_path: Path) -> None:
    a, b = images["busybox:esgz"], images["busybox:zstdchunked"]
    lazyshim(store, "pull", a)
    lazyshim(store, "pull", b)
    assert len(layer_dirs(store)) == 4
    b_trees = image_trees(store, b)
    with overlay(b_trees, tmp_path / "mnt"):  # as a running container would use them
        lazyshim(store, "rmi", b)
        assert len(layer_dirs(store)) == 4, "layers under a mounted overlay were deleted"
    lazyshim(store, "rmi", a)  # collects b's layers too, now unmounted
    assert layer_dirs(store) == []
    assert list((store / "images").iterdir()) == []
    out = lazyshim(store, "images").stdout.splitlines()
    assert out[0].split() == ["IMAGE", "ID", "LAYERS", "SIZE"] and len(out) == 1


@pytest.mark.parametrize("variant,fmt", [("esgz", "estargz"), ("zstdchunked", "zstd:chunked"),
                                         ("podman-zstdchunked", "zstd:chunked"), ("legacy", "legacy")])
def test_images_and_inspect_for_every_format(variant: str, fmt: str, images: dict[str, str], store: Path) -> None:
    ref = images[f"busybox:{variant}"]
    lazyshim(store, "pull", ref)
    lines = lazyshim(store, "images").stdout.splitlines()
    assert lines[0].split() == ["IMAGE", "ID", "LAYERS", "SIZE"]
    row = lines[1].split()
    assert row[0] == ref and row[2] == "2" and row[4] == "MB"
    info = json.loads(lazyshim(store, "inspect", ref).stdout)
    assert [layer["format"] for layer in info["layers"]] == [fmt, fmt]
    files = sum(layer["files"] for layer in info["layers"])
    filled = sum(layer["filled"] for layer in info["layers"])
    assert files > 0 and filled == (files if fmt == "legacy" else 0)


# ------------------------------------------------------------------ convert + reference tools


def _podman(tmp: Path) -> list[str]:
    tmp.mkdir(parents=True, exist_ok=True)
    conf = tmp / "containers.conf"
    # This sandbox may not raise rlimits (podman's defaults) nor drive crun's cgroups.
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    return ["podman", "--root", str(tmp / "root"), "--runroot", str(tmp / "run"), "--storage-driver", "vfs",
            "--events-backend", "none", "--cgroup-manager", "cgroupfs", "--tmpdir", str(tmp / "tmp"),
            "--runtime", "runc"]


def test_converted_images_run_in_podman_and_lazily_in_lazyshim(images: dict[str, str], registry: Registry,
                                                               store: Path, tmp_path: Path) -> None:
    prio = tmp_path / "prio"
    prio.write_text("# what hello.sh needs first\n/bin/busybox\n/app/hello.sh\n/nonexistent\n")
    esgz = f"{registry.host}/busybox:lazyshim-esgz"
    zstd = f"{registry.host}/busybox:lazyshim-zstdchunked"
    p = lazyshim(store, "convert", images["busybox:legacy"], esgz, "--prioritize", str(prio))
    assert p.stdout.startswith(esgz + "@sha256:")
    assert "prioritized path(s) are in no layer, e.g. /nonexistent" in p.stderr
    lazyshim(store, "convert", f"{registry.host}/busybox:legacy", zstd, "--format", "zstd:chunked")

    for ref, fmt in ((esgz, "estargz"), (zstd, "zstd:chunked")):
        manifest = json.loads(subprocess.run(
            ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{ref}"],
            check=True, capture_output=True, text=True).stdout)
        config = json.loads(subprocess.run(
            ["skopeo", "inspect", "--config", "--raw", "--tls-verify=false", f"docker://{ref}"],
            check=True, capture_output=True, text=True).stdout)
        assert len(config["history"]) == 2 and config["config"]["Cmd"] == ["/app/hello.sh"]
        for layer in manifest["layers"]:
            ann = layer["annotations"]
            if fmt == "estargz":
                assert layer["mediaType"] == MT_GZIP and estargz.TOC_DIGEST_ANNOTATION in ann
            else:
                assert layer["mediaType"].endswith("+zstd")
                assert "io.github.containers.zstd-chunked.manifest-checksum" in ann
            assert int(ann[estargz.UNCOMPRESSED_SIZE_ANNOTATION]) > 0
        lazyshim(store, "pull", ref)
        info = json.loads(lazyshim(store, "inspect", ref).stdout)
        assert [x["format"] for x in info["layers"]] == [fmt, fmt]
        assert all(x["filled"] == 0 for x in info["layers"])
        if fmt == "estargz":  # landmarks: busybox first in the base layer, hello.sh in the app layer
            assert [x["prioritized"] for x in info["layers"]] == [1, 1]
        trees = [Path(x["tree"]) for x in info["layers"]]
        st = (trees[1] / "app/random.bin").stat()
        assert st.st_blocks == 0 and st.st_size > 4 << 20

    pdir = Path(tempfile.mkdtemp(prefix="lzp-"))  # podman refuses a runroot longer than 50 characters
    try:
        _podman_runs(pdir, (esgz, zstd))
    finally:
        shutil.rmtree(pdir, ignore_errors=True)


def _podman_runs(pdir: Path, refs: tuple[str, ...]) -> None:
    podman = _podman(pdir)
    env = dict(os.environ, CONTAINERS_CONF=str(pdir / "containers.conf"))
    for ref in refs:
        # podman checks every layer's diff_id against the tar it decompresses
        subprocess.run([*podman, "pull", "-q", "--tls-verify=false", f"docker://{ref}"], check=True,
                       capture_output=True, env=env, timeout=120)
        p = subprocess.run([*podman, "run", "--rm", "--network", "none", ref], capture_output=True, text=True,
                           env=env, timeout=120)
        assert p.stdout.strip() == "hello from busybox sh", p.stderr
    subprocess.run([*podman, "rmi", "-af"], capture_output=True, env=env, timeout=60)


def test_convert_errors_are_one_line(registry: Registry, images: dict[str, str], store: Path,
                                     tmp_path: Path) -> None:
    p = lazyshim(store, "convert", f"oci:{tmp_path}/nope", f"{registry.host}/x:y", check=False)
    assert_one_line_failure(p, "not an oci layout")
    prio = tmp_path / "prio"
    prio.write_text("relative/path\n")
    p = lazyshim(store, "convert", images["busybox:legacy"], f"{registry.host}/x:y", "--prioritize", str(prio),
                 check=False)
    assert_one_line_failure(p, "absolute")
    p = lazyshim(store, "convert", images["busybox:legacy"], f"{registry.host}/x:y", "--format", "zstd:chunked",
                 "--prioritize", str(prio), check=False)
    assert_one_line_failure(p, "absolute", "estargz")


def test_record_then_prioritize_fetches_the_start_up_set_in_few_requests(tmp_path: Path, images: dict[str, str],
                                                                          registry: Registry) -> None:
    """`lazyshim record` lists what python opens; `convert --prioritize` puts those files
    first; a run of the optimized image fetches them in a few large range requests."""
    prio = tmp_path / "prio.txt"
    lazyshim(tmp_path / "rec", "record", "-o", str(prio), images["python:esgz"], "python3", "-c", "import json")
    names = prio.read_text().split()
    assert "/usr/bin/python3.11" in names and "/usr/lib/python3.11/json/decoder.py" in names
    legacy = images["python:legacy"]
    optimized = legacy.rsplit(":", 1)[0] + ":rec-opt"
    lazyshim(tmp_path / "conv", "convert", "-q", legacy, optimized, "--prioritize", str(prio))
    store = tmp_path / "store"
    lazyshim(store, "pull", optimized)
    registry.clear_access_log()
    env_mode = {"LAZYSHIM_BACKGROUND_FETCH": "prioritized"}
    p = subprocess.run([*LAZYSHIM, "run", "--rm", optimized, "python3", "-c", "import json; print('ok')"],
                       env=dict(os.environ, LAZYSHIM_ROOT=str(store), **env_mode), capture_output=True, text=True,
                       timeout=120)
    assert p.stdout == "ok\n", p.stderr
    ranges = [e for e in registry.access_log() if e.status == 206]
    assert len(ranges) < len(names) / 2, f"{len(ranges)} range requests for {len(names)} files"
