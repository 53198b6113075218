"""The layer store's names, its file-system answers and podman's use counts, without FUSE:
the operations are called as libfuse would, over a fake set of layers."""

from __future__ import annotations

import base64
import errno
import os
import stat
from pathlib import Path

import mfusepy
import pytest

from shim.alsfs import names
from shim.alsfs.fs import LayerStoreFS
from shim.alsfs.layers import Entry, NotServed
from shim.errors import LazyshimError
from shim.store import als
from shim.store.layout import Store

REF = "127.0.0.1:5000/py:esgz"
B64 = base64.standard_b64encode(REF.encode()).decode()
LAYER = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
BROKEN = "sha256:" + "ef" * 32


class FakeLayers:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.pulls: list[tuple[str, str]] = []
        self.uses: dict[str, int] = {}
        blob = root / "blob"
        blob.write_bytes(b"the whole blob")
        self.blob = blob

    def entry(self, ref: str, digest: str) -> Entry:
        self.pulls.append((ref, digest))
        if digest == OTHER:
            raise NotServed("legacy")
        if digest == BROKEN:
            raise LazyshimError("registry 127.0.0.1:5000: connection refused")
        return Entry(ref, digest, b'{"compressed-diff-digest": "x"}', 14)

    def diff(self, digest: str) -> Path:
        return self.root / "tree"

    def open_blob(self, entry: Entry) -> int:
        return os.open(self.blob, os.O_RDONLY)

    def use(self, digest: str) -> int:
        self.uses[digest] = self.uses.get(digest, 0) + 1
        return self.uses[digest]

    def release(self, digest: str) -> int:
        self.uses[digest] -= 1
        return self.uses[digest]


@pytest.fixture
def fs(tmp_path: Path) -> LayerStoreFS:
    return LayerStoreFS(FakeLayers(tmp_path))


def _errno(call, *args) -> int:
    with pytest.raises(mfusepy.FuseOSError) as e:
        call(*args)
    return e.value.errno


@pytest.mark.parametrize("path", [
    "/not base64!", "/" + base64.standard_b64encode(b"../../etc").decode(),
    "/" + B64.rstrip("="),                                         # unpadded: not the one spelling
    "/" + base64.urlsafe_b64encode(b"127.0.0.1:5000/a~b:c>d").decode(),
    f"/{B64}/sha256:..", f"/{B64}/sha256:{'g' * 64}", f"/{B64}/md5:{'a' * 32}", f"/{B64}/{LAYER}/passwd",
    f"/{B64}/{LAYER}/diff/x", f"/{B64}/../{LAYER}", "relative", "/" + "A" * 300,
    "/" + base64.standard_b64encode(b"\xff\xfe").decode(),
])
def test_hostile_names_are_no_names(path: str) -> None:
    assert names.parse(path) is None


def test_good_names_parse() -> None:
    assert names.parse("/") == names.Name()
    assert names.parse(f"/{B64}") == names.Name(REF)
    assert names.parse(f"/{B64}/{LAYER}") == names.Name(REF, LAYER)
    assert names.parse(f"/{B64}/{LAYER}/blob") == names.Name(REF, LAYER, "blob")


def test_hostile_names_are_enoent_and_pull_nothing(fs: LayerStoreFS) -> None:
    for path in ("/zz!", f"/{B64}/sha256:bad/diff", f"/{B64}/{LAYER}/use", f"/{B64}/{LAYER}/other"):
        assert _errno(fs.getattr, path) == errno.ENOENT
    assert fs.layers.pulls == []


def test_dirs_without_network_then_files_pull(fs: LayerStoreFS) -> None:
    assert stat.S_ISDIR(fs.getattr(f"/{B64}")["st_mode"])
    assert stat.S_ISDIR(fs.getattr(f"/{B64}/{LAYER}")["st_mode"])
    assert fs.layers.pulls == []
    st = fs.getattr(f"/{B64}/{LAYER}/diff")
    assert stat.S_ISLNK(st["st_mode"]) and fs.readlink(f"/{B64}/{LAYER}/diff") == str(fs.layers.root / "tree")
    assert fs.getattr(f"/{B64}/{LAYER}/blob")["st_size"] == 14
    fh = fs.open(f"/{B64}/{LAYER}/info", os.O_RDONLY)
    assert fs.read(f"/{B64}/{LAYER}/info", 4096, 0, fh) == b'{"compressed-diff-digest": "x"}'
    fs.release(f"/{B64}/{LAYER}/info", fh)
    fh = fs.open(f"/{B64}/{LAYER}/blob", os.O_RDONLY)
    assert fs.read(f"/{B64}/{LAYER}/blob", 5, 4, fh) == b"whole"
    fs.release(f"/{B64}/{LAYER}/blob", fh)
    assert _errno(fs.open, f"/{B64}/{LAYER}/blob", os.O_RDWR) == errno.EACCES
    assert fs.readdir(f"/{B64}/{LAYER}", 0) == [".", "..", "diff", "info", "blob"]


def test_not_lazy_is_enoent_and_failures_are_eio_in_one_line(fs: LayerStoreFS, capsys) -> None:
    assert _errno(fs.getattr, f"/{B64}/{OTHER}/diff") == errno.ENOENT
    assert _errno(fs.getattr, f"/{B64}/{BROKEN}/info") == errno.EIO
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lazyshim: layer-store: ") and "connection refused" in err


def test_use_and_release_are_counted_and_answered_enoent(fs: LayerStoreFS) -> None:
    assert _errno(fs.create, f"/{B64}/{LAYER}/use", 0o644, 0) == errno.ENOENT
    assert _errno(fs.create, f"/{B64}/{LAYER}/use", 0o644, 0) == errno.ENOENT
    assert _errno(fs.rmdir, f"/{B64}/{LAYER}") == errno.ENOENT
    assert fs.layers.uses == {LAYER: 1}
    assert _errno(fs.create, f"/{B64}/{LAYER}/info", 0o644, 0) == errno.ENOENT
    assert fs.layers.uses == {LAYER: 1}


def test_use_counts_keep_layers_from_gc(tmp_path: Path) -> None:
    from shim.store.gc import collect

    store = Store(tmp_path / "store")
    store.ensure()
    for d in (LAYER, OTHER):
        store.layer_dir(d).mkdir()
    assert als.count_use(store, LAYER, +1) == 1
    assert als.count_use(store, OTHER, -1) == 0  # never below zero
    assert als.used_layers(store) == {LAYER.replace(":", "-")}
    assert collect(store) == [OTHER.replace(":", "-")]
    assert als.count_use(store, LAYER, -1) == 0
    assert als.used_layers(store) == set()
    assert collect(store) == [LAYER.replace(":", "-")]


def test_an_unexpected_error_in_an_operation_logs_one_line(capsys) -> None:
    import logging

    from shim.alsfs.server import _one_line_logs

    _one_line_logs()
    try:
        raise KeyError("surprise\nsecond line")
    except KeyError:
        logging.getLogger("fuse").exception("Uncaught exception from FUSE operation %s", "getattr")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "KeyError" in err, err
