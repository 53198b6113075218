"""Store layout v2 in-process: object names from hostile digests, the layout choice, and
fills that create data objects (no mounts needed: objects are plain files)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from conftest import contents
from test_convert_store import _chunks, _entries, _tar

from shim import convert
from shim.errors import LazyshimError
from shim.formats import estargz
from shim.formats.toc import Entry
from shim.store.filler import COMPLETE_MARK, FileBlobSource, create_filled_map, is_complete
from shim.store.layout import Store
from shim.store.layouts import configured_layout, layout_of
from shim.store.metadata import LayerMeta
from shim.store.objects import ObjectFiller, object_name

LAYER = "sha256:" + "ab" * 32


def _reg(digest: str, size: int = 5) -> Entry:
    return Entry(name="f", type="reg", mode=0o644, uid=0, gid=0, size=size, mtime=0, link="", dev_major=0,
                 dev_minor=0, xattrs={}, digest=digest, chunks=[])


def test_object_names_come_from_hex_digests_only() -> None:
    good = "sha256:" + "0123456789abcdef" * 4
    assert object_name(LAYER, 3, _reg(good)) == f"objects/01/{good[7:]}"
    for hostile in ("sha256:../../../etc/passwd", "sha256:" + "AB" * 32, "sha256:" + "ab" * 31,
                    "sha512:" + "ab" * 64, "", "sha256:" + "ab" * 31 + "/x"):
        assert object_name(LAYER, 3, _reg(hostile)) == f"entries/sha256-{'ab' * 32}/3", hostile
    assert object_name(LAYER, 3, _reg(good, size=0)) is None  # an empty file needs no object


def test_layout_is_chosen_once_and_a_bad_choice_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYSHIM_STORE_LAYOUT", "v9")
    with pytest.raises(LazyshimError, match="expected v1 or v2"):
        configured_layout()
    monkeypatch.setenv("LAZYSHIM_STORE_LAYOUT", "v1")
    assert layout_of(Store(tmp_path / "s")).name == "v1"
    monkeypatch.setenv("LAZYSHIM_STORE_LAYOUT", "v2")
    with pytest.raises(LazyshimError, match="uses layout v1"):
        layout_of(Store(tmp_path / "s"))
    monkeypatch.delenv("LAZYSHIM_STORE_LAYOUT")
    assert layout_of(Store(tmp_path / "s")).name == "v1"  # recorded
    old = Store(tmp_path / "old")  # layers from before layouts were recorded: v1, no probe
    (old.layers / "sha256-00").mkdir(parents=True)
    assert layout_of(old).name == "v1"


ENTRIES = _entries()


def _object_layer(tmp_path: Path, blob: bytes):
    read = convert.read_layer(_chunks(gzip.compress(_tar(ENTRIES))), convert.MT_GZIP)
    layer = convert.encode_layer(read, "estargz", None)
    (tmp_path / "blob").write_bytes(blob if blob else layer.blob)
    off, fsize = estargz.parse_footer(layer.blob[-estargz.FOOTER_SIZE:])
    s, e = estargz.toc_range(len(layer.blob), off, fsize)
    toc = estargz.parse_toc(estargz.toc_json_from_region(layer.blob[s:e]), off)
    d = tmp_path / "layer"
    d.mkdir()
    create_filled_map(d, len(toc.entries))
    meta = LayerMeta(digest=layer.digest, format="estargz", blob_size=len(layer.blob), toc=toc)
    (tmp_path / "data").mkdir()
    (tmp_path / "tmp").mkdir()
    filler = ObjectFiller(d, meta, lambda: FileBlobSource(tmp_path / "blob"), tmp_path / "data", tmp_path / "tmp")
    return layer, meta, filler


def test_fills_create_verified_objects_and_identical_files_share_one(tmp_path: Path) -> None:
    layer, meta, filler = _object_layer(tmp_path, b"")
    regs = [i for i, e in enumerate(meta.toc.entries) if e.type == "reg" and e.size]
    filler.fill(regs[0])
    first = filler.object_path(regs[0])
    assert first is not None and first.read_bytes() == contents(ENTRIES)[meta.toc.entries[regs[0]].name]
    filler.fill_many(regs)
    for i in regs:
        assert filler.object_path(i).read_bytes() == contents(ENTRIES)[meta.toc.entries[i].name]
    assert not list((tmp_path / "tmp").iterdir()), "temporaries left behind"
    # A second layer with the same files finds every object present: nothing to fetch.
    other = ObjectFiller(tmp_path / "layer", meta, lambda: pytest.fail("fetched"), tmp_path / "data",
                         tmp_path / "tmp")
    assert other.count_unfilled() == 0


def test_a_corrupt_blob_leaves_no_object_and_no_temporary(tmp_path: Path) -> None:
    layer, meta, _ = _object_layer(tmp_path, b"")
    blob = bytearray((tmp_path / "blob").read_bytes())
    big = max((e for e in meta.toc.entries if e.type == "reg"), key=lambda e: e.size)
    c = big.chunks[-1]
    blob[(c.offset + c.end) // 2] ^= 0xFF
    (tmp_path / "blob").write_bytes(bytes(blob))
    idx = meta.toc.entries.index(big)
    filler = ObjectFiller(tmp_path / "layer", meta, lambda: FileBlobSource(tmp_path / "blob"), tmp_path / "data",
                          tmp_path / "tmp")
    filler.readahead = False  # this file alone: neighbours' temporaries are not what is checked
    with pytest.raises(LazyshimError):
        filler.fill(idx)
    assert not filler.object_path(idx).exists() and not filler.is_filled(idx)
    assert not list((tmp_path / "tmp").iterdir())


def test_a_mark_whose_object_was_lost_is_dropped_not_trusted(tmp_path: Path) -> None:
    """A crash after the byte-map mark but before the object's rename reached the disk: the
    next filler refetches instead of marking the layer complete over a missing object."""
    layer, meta, filler = _object_layer(tmp_path, b"")
    regs = [i for i, e in enumerate(meta.toc.entries) if e.type == "reg" and e.size]
    filler.fill_many(regs)
    (tmp_path / "layer" / COMPLETE_MARK).unlink(missing_ok=True)
    lost = filler.object_path(regs[0])
    lost.unlink()
    again = ObjectFiller(tmp_path / "layer", meta, lambda: FileBlobSource(tmp_path / "blob"), tmp_path / "data",
                         tmp_path / "tmp")
    assert not again.is_filled(regs[0]) and again.unfilled >= 1
    assert not is_complete(tmp_path / "layer")
    again.fill(regs[0])
    assert lost.read_bytes() == contents(ENTRIES)[meta.toc.entries[regs[0]].name]
