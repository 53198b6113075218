"""Both store layouts with real overlayfs and the real registry: what a reader outside the
supervised container gets before a fill, sharing of data objects, and the layout choice."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from integration.registry import Registry
from integration.storeview import layout_name
from integration.test_image_core import MT_GZIP, _ti, push_image
from integration.test_lazy_run import LAZYSHIM
from shim.formats import estargz
from shim.formats.estargz_writer import build_estargz
from shim.store.layout import Store
from shim.store.layouts import load_meta


def run(store: Path, layout: str | None, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, LAZYSHIM_ROOT=str(store))
    env.pop("LAZYSHIM_STORE_LAYOUT", None)
    if layout:
        env["LAZYSHIM_STORE_LAYOUT"] = layout
    p = subprocess.run([*LAZYSHIM, *args], env=env, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"lazyshim {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def image_digests(store: Path) -> dict[str, str]:
    """Path -> whole-file digest of every non-empty regular file, as the merged image has it."""
    s = Store(store)
    out: dict[str, str] = {}
    for d in sorted(s.layers.iterdir()):
        for e in load_meta(s, d.name.replace("-", ":", 1)).toc.entries:
            if e.type == "reg" and e.size and e.digest:
                out[e.name] = e.digest
    return out


def read_all(root: Path, want: dict[str, str]) -> tuple[int, int, int]:
    """(exact, failed, wrong): every regular file read from the host side."""
    exact = failed = wrong = 0
    for name, digest in want.items():
        p = root / name
        if p.is_symlink() or not p.is_file():
            continue  # replaced by an upper layer
        try:
            data = p.read_bytes()
        except OSError:
            failed += 1
            continue
        if "sha256:" + hashlib.sha256(data).hexdigest() == digest:
            exact += 1
        else:
            wrong += 1
    return exact, failed, wrong


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_host_reader_of_lazy_mount_gets_exact_bytes_or_an_error(layout: str, tmp_path: Path,
                                                               images: dict[str, str]) -> None:
    """`cat` under `lazyshim mount` before any fill: v2 fails closed (ENOENT), never zeros, and
    serves the real bytes once filled, through the same mount.  v1 cannot: an unfilled
    placeholder reads as zeros (README, Known limits)."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    ref = images["busybox:esgz"]
    run(store, layout, "mount", ref, str(mnt))
    try:
        assert layout_name(store) == layout
        want = image_digests(store)
        exact, failed, wrong = read_all(mnt, want)
        if layout == "v2":
            assert wrong == 0, f"{wrong} files read with bytes that are not the image's"
            assert failed > 0 and exact + failed >= len(want) - 2
        else:
            assert wrong > 0, "v1 placeholders read as zeros outside the supervisor (documented)"
        run(store, layout, "fetch", ref)
        exact, failed, wrong = read_all(mnt, want)
        assert (failed, wrong) == (0, 0) and exact > 0
    finally:
        run(store, layout, "umount", str(mnt), check=False)


def test_metadata_trees_are_rebuilt_without_refetching(tmp_path: Path, images: dict[str, str],
                                                       registry: Registry) -> None:
    """The tmpfs of metadata trees lost (a reboot): the next mount rebuilds it from the CBOR
    metadata and the objects on disk serve every file, with no registry traffic."""
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    ref = images["busybox:esgz"]
    run(store, "v2", "pull", ref)
    run(store, "v2", "fetch", ref)
    subprocess.run(["umount", "-l", str(store / "meta")], check=True)
    registry.clear_access_log()
    run(store, "v2", "mount", ref, str(mnt))
    try:
        want = image_digests(store)
        exact, failed, wrong = read_all(mnt, want)
        assert (failed, wrong) == (0, 0) and exact > 0
    finally:
        run(store, "v2", "umount", str(mnt), check=False)
    assert not [e for e in registry.access_log() if e.method == "GET" and e.blob_digest], "refetched"


def test_two_images_sharing_a_file_fetch_its_object_once(tmp_path: Path, registry: Registry) -> None:
    shared = os.urandom(400_000)  # incompressible: its range is most of either blob
    a = build_estargz([(_ti("a"), b"only in a\n"), (_ti("lib/shared.so"), shared)])
    b = build_estargz([(_ti("b"), b"only in b\n"), (_ti("opt/same-bytes.so"), shared)])
    refs = [push_image(registry.host, "share", tag, [(lay.blob, MT_GZIP,
                                                      {estargz.TOC_DIGEST_ANNOTATION: lay.toc_digest}, lay.diff_id)])
            for tag, lay in (("a", a), ("b", b))]
    store = tmp_path / "store"
    for ref in refs:
        run(store, "v2", "pull", ref)
    registry.clear_access_log()
    run(store, "v2", "fetch", refs[0])
    run(store, "v2", "fetch", refs[1])
    served_a = registry.bytes_served("sha256:" + hashlib.sha256(a.blob).hexdigest(), min_requests=1)
    served_b = registry.bytes_served("sha256:" + hashlib.sha256(b.blob).hexdigest(), min_requests=1)
    assert served_a > len(shared) and served_b < 10_000, (served_a, served_b)
    objects = [p for p in (store / "data").rglob("*") if p.is_file()]
    assert sum(1 for p in objects if p.read_bytes() == shared) == 1
    df = run(store, "v2", "df").stdout
    assert "4 of 4 filled" in df and "more that identical files share" in df, df

    # Removing one image keeps the object the other still names; removing both frees it.
    run(store, "v2", "rmi", refs[0])
    left = sorted(p.read_bytes() for p in (store / "data").rglob("*") if p.is_file())
    assert left == sorted([b"only in b\n", shared])
    run(store, "v2", "rmi", refs[1])
    assert not [p for p in (store / "data").rglob("*") if p.is_file()]
    assert run(store, "v2", "gc").stdout.strip() == "nothing to remove"


def test_bad_or_conflicting_layout_is_a_one_line_error(tmp_path: Path, images: dict[str, str]) -> None:
    store = tmp_path / "store"
    p = run(store, "v3", "images", check=False)
    assert p.returncode != 0 and p.stderr.startswith("lazyshim: ") and p.stderr.count("\n") == 1, p.stderr
    run(store, "v1", "pull", images["busybox:esgz"])
    p = run(store, "v2", "images", check=False)
    assert p.returncode != 0 and "layout v1" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    assert run(store, None, "images").returncode == 0  # the recorded layout holds


def _objects(store: Path) -> dict[bytes, Path]:
    return {p.read_bytes(): p for p in (store / "data").rglob("*") if p.is_file()}


def test_gc_max_size_evicts_least_recently_used_data_and_never_a_mounted_layers(tmp_path: Path,
                                                                                 registry: Registry) -> None:
    """`gc --max-size`: the oldest data of layers no overlay uses goes first and is refetched on
    the next fill; data a mounted layer names stays whatever the cap; a reader never gets zeros."""
    shared = os.urandom(300_000)
    a = build_estargz([(_ti("a"), b"only in a\n"), (_ti("lib/shared.so"), shared)])
    b = build_estargz([(_ti("b"), b"only in b\n"), (_ti("opt/same-bytes.so"), shared)])
    refs = [push_image(registry.host, "evict", tag, [(lay.blob, MT_GZIP,
                                                      {estargz.TOC_DIGEST_ANNOTATION: lay.toc_digest}, lay.diff_id)])
            for tag, lay in (("a", a), ("b", b))]
    store, mnt = tmp_path / "store", tmp_path / "mnt"
    for ref in refs:
        run(store, "v2", "pull", ref)
        run(store, "v2", "fetch", ref)
    assert all((d / "complete").exists() for d in (store / "layers").iterdir())

    # The shared object was last read days ago: it goes first, and alone fits the cap.
    old = _objects(store)[shared]
    os.utime(old, (old.stat().st_atime - 3 * 86400, old.stat().st_mtime))
    out = run(store, "v2", "gc", "--max-size", "1k").stdout
    assert "1 least recently used data file(s) (300000 bytes)" in out, out
    assert set(_objects(store)) == {b"only in a\n", b"only in b\n"}
    assert not any((d / "complete").exists() for d in (store / "layers").iterdir()), "would run unsupervised"

    # A mounted image pins its data; the other image's goes.  Its reader gets bytes or errors.
    run(store, "v2", "mount", refs[0], str(mnt))
    try:
        p = run(store, "v2", "gc", "--max-size", "0")
        assert "1 least recently used data file(s) (10 bytes)" in p.stdout, p.stdout
        assert "data still takes 10 bytes: 10 of them belong to layers in use" in p.stderr, p.stderr
        assert set(_objects(store)) == {b"only in a\n"}
        assert (mnt / "a").read_bytes() == b"only in a\n"
        with pytest.raises(OSError):
            (mnt / "lib/shared.so").read_bytes()  # evicted before the mount: fails, never zeros
    finally:
        run(store, "v2", "umount", str(mnt), check=False)

    # The next fill refetches what was evicted, and the bytes are the image's.
    registry.clear_access_log()
    run(store, "v2", "fetch", refs[1])
    assert registry.access_log(), "nothing refetched"
    run(store, "v2", "mount", refs[1], str(mnt))
    try:
        assert (mnt / "opt/same-bytes.so").read_bytes() == shared
        assert (mnt / "b").read_bytes() == b"only in b\n"
    finally:
        run(store, "v2", "umount", str(mnt), check=False)

    bad = run(store, "v2", "gc", "--max-size", "nan", check=False)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "--max-size" in bad.stderr, bad.stderr
