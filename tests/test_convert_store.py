"""Converter pieces and store robustness, in-process: layers made by our writers, trees
built in tmp dirs, fills served from a local blob file."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import pytest
from conftest import contents, other, reg, sample_entries

from shim import convert
from shim.errors import LazyshimError
from shim.formats import estargz, zstdchunked
from shim.formats.toc import Entry, Toc
from shim.store.filler import FileBlobSource, LayerFiller, create_filled_map
from shim.store.metadata import LayerMeta
from shim.store.placeholders import TreeOptions, build_tree


def _tar(entries, fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for ti, data in entries:
            ti.size = len(data or b"")
            tf.addfile(ti, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _entries():
    """The shared sample minus its security.capability xattr, which a real file system
    refuses to set with that (made-up) value."""
    return [(ti, d) for ti, d in sample_entries() if ti.name != "etc/cap"]


def _chunks(data: bytes, n: int = 65536):
    return iter([data[i:i + n] for i in range(0, len(data), n)])


def _lazy_layer(tmp_path: Path, fmt: str, entries, prioritized=None):
    """Convert `entries` with the converter's own functions, then build and fill the tree."""
    blob_gz = gzip.compress(_tar(entries))
    read = convert.read_layer(_chunks(blob_gz), convert.MT_GZIP)
    layer = convert.encode_layer(read, fmt, prioritized)
    (tmp_path / "blob").write_bytes(layer.blob)
    if fmt == "estargz":
        off, fsize = estargz.parse_footer(layer.blob[-estargz.FOOTER_SIZE:])
        s, e = estargz.toc_range(len(layer.blob), off, fsize)
        toc = estargz.parse_toc(estargz.toc_json_from_region(layer.blob[s:e]), off)
    else:
        loc = zstdchunked.manifest_location(layer.annotations)
        raw = zstdchunked.decode_manifest(layer.blob[loc.offset:loc.offset + loc.length], loc)
        toc = zstdchunked.parse_toc(raw, loc.data_end)
    d = tmp_path / "layer"
    (d / "tree").mkdir(parents=True)
    meta = LayerMeta(digest=layer.digest, format=fmt, blob_size=len(layer.blob), toc=toc)
    meta.inodes = build_tree(toc, d / "tree")
    create_filled_map(d, len(toc.entries))
    return layer, meta, LayerFiller(d, meta, lambda: FileBlobSource(tmp_path / "blob"))


@pytest.mark.parametrize("fmt", ["estargz", "zstd:chunked"])
def test_converted_layer_fills_to_the_original_content(tmp_path: Path, fmt: str) -> None:
    entries = _entries()
    layer, meta, filler = _lazy_layer(tmp_path, fmt, entries)
    assert layer.diff_id.startswith("sha256:") and layer.uncompressed_size > 500_000
    filler.fill_many([i for i, e in enumerate(meta.toc.entries) if e.type == "reg" and e.size])
    for name, data in contents(entries).items():
        assert (tmp_path / "layer/tree" / name).read_bytes() == data, name
    # every file filled from a handful of span requests, not one request per file
    assert filler.files_filled == sum(1 for d in contents(entries).values() if d)


def test_read_layer_normalises_what_the_formats_cannot_carry() -> None:
    ti_frac, d1 = reg("a", b"x")
    ti_frac.mtime = 1_700_000_000.75
    ti_x, d2 = reg("b", b"y", pax_headers={"SCHILY.xattr.user.empty": "", "SCHILY.xattr.user.k": "v"})
    ti_cont, d3 = reg("c", b"z")
    ti_cont.type = tarfile.CONTTYPE
    old_toc, d4 = reg("stargz.index.json", b"{}")  # a converted source's own TOC is not carried over
    blob = gzip.compress(_tar([(ti_frac, d1), (ti_x, d2), (ti_cont, d3), (old_toc, d4)]))
    out = convert.read_layer(_chunks(blob), convert.MT_GZIP)
    by = {ti.name: ti for ti, _ in out}
    assert sorted(by) == ["a", "b", "c"]
    assert by["a"].mtime == 1_700_000_000 and "mtime" not in by["a"].pax_headers
    assert by["b"].pax_headers == {"SCHILY.xattr.user.k": "v"}
    assert by["c"].type == tarfile.REGTYPE


def test_read_layer_refuses_big_layers_and_odd_media_types() -> None:
    blob = gzip.compress(_tar([reg("big", os.urandom(5000))]))
    with pytest.raises(LazyshimError, match="more than 0 MiB uncompressed"):
        convert.read_layer(_chunks(blob), convert.MT_GZIP, limit=4000)
    with pytest.raises(LazyshimError, match="cannot convert media type"):
        convert.read_layer(_chunks(blob), "application/vnd.example.foreign")


def test_read_layer_finishes_the_stream_so_its_digest_is_checked() -> None:
    seen = []

    def stream():
        blob = gzip.compress(_tar([reg("f", b"data")]))
        yield blob
        seen.append("end")  # a digest-checking source raises here on a mismatch

    convert.read_layer(stream(), convert.MT_GZIP)
    assert seen == ["end"]


def test_oci_layout_stream_checks_the_digest(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    digest = "sha256:" + "0" * 64
    (blobs / ("0" * 64)).write_bytes(b"not what the digest says")
    src = object.__new__(convert.OciLayoutSource)
    src.dir, src.name = tmp_path, "oci:test"
    desc = type("D", (), {"digest": digest})()
    with pytest.raises(LazyshimError, match="does not match its digest"):
        list(src.stream(desc))


def test_oci_spec_split(tmp_path: Path) -> None:
    assert convert._split_oci("/some/dir:tag") == ("/some/dir", "tag")
    assert convert._split_oci("/some/dir") == ("/some/dir", None)
    weird = tmp_path / "a:b"
    weird.mkdir()
    assert convert._split_oci(str(weird)) == (str(weird), None)


def test_prioritize_file(tmp_path: Path) -> None:
    f = tmp_path / "list"
    f.write_text("# comment\n/bin/sh\n\n/etc//passwd\n/bin/sh\n")
    assert convert.read_prioritize_file(str(f)) == ["bin/sh", "etc/passwd"]
    f.write_text("bin/sh\n")
    with pytest.raises(LazyshimError, match="not an absolute path"):
        convert.read_prioritize_file(str(f))
    f.write_text("/a/../../b\n")
    with pytest.raises(LazyshimError, match="escapes"):
        convert.read_prioritize_file(str(f))


def test_prioritized_layer_has_its_landmark(tmp_path: Path) -> None:
    _, meta, _ = _lazy_layer(tmp_path, "estargz", _entries(), ["bin/sh", "etc/passwd"])
    assert meta.toc.prioritized == 2
    regs = [e.name for e in meta.toc.entries if e.type == "reg"]
    assert regs[:2] == ["bin/sh", "etc/passwd"]


# ------------------------------------------------------------------ trees


def _toc(*entries: Entry) -> Toc:
    return Toc(entries=list(entries))


def test_duplicate_names_later_wins_and_forgets_the_replaced_inode(tmp_path: Path) -> None:
    toc = _toc(Entry("f", "reg", size=10), Entry("g", "reg", size=3), Entry("h", "hardlink", link="g"),
               Entry("f", "reg", size=20, mode=0o600), Entry("g", "reg", size=4))
    inodes = build_tree(toc, tmp_path)
    assert (tmp_path / "f").stat().st_size == 20 and (tmp_path / "f").stat().st_mode & 0o777 == 0o600
    assert inodes[0] == 0, "a replaced file's inode may be reused: it must not map to its entry"
    assert inodes[1] != 0, "g's first inode lives on through the hardlink h"
    assert inodes[1] == (tmp_path / "h").stat().st_ino
    assert inodes[3] == (tmp_path / "f").stat().st_ino and inodes[4] == (tmp_path / "g").stat().st_ino


def test_file_removed_with_its_directory_loses_its_inode(tmp_path: Path) -> None:
    toc = _toc(Entry("d", "dir", mode=0o755), Entry("d/f", "reg", size=5), Entry("d", "reg", size=1))
    inodes = build_tree(toc, tmp_path)
    assert inodes[1] == 0 and (tmp_path / "d").is_file()


def test_entry_below_a_symlink_fails_loudly(tmp_path: Path) -> None:
    toc = _toc(Entry("l", "symlink", link="/etc"), Entry("l/passwd", "reg", size=1))
    with pytest.raises(LazyshimError, match="below symlink 'l'"):
        build_tree(toc, tmp_path)
    assert not Path("/etc/passwd").stat().st_size == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_device_nodes_as_root(tmp_path: Path) -> None:
    build_tree(_toc(Entry("null", "char", dev_major=1, dev_minor=3, mode=0o666)), tmp_path)
    st = os.lstat(tmp_path / "null")
    assert os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3


def test_device_nodes_rootless_is_a_clear_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can mknod; the error path is for rootless stores")
    with pytest.raises(LazyshimError, match="device node"):
        build_tree(_toc(Entry("null", "char", dev_major=1, dev_minor=3)), tmp_path, TreeOptions(False))


# ------------------------------------------------------------------ client knobs


def test_registry_env_knobs(monkeypatch: pytest.MonkeyPatch) -> None:
    from shim import sources

    monkeypatch.setenv(sources.RETRIES_ENV, "0")
    monkeypatch.setenv(sources.TIMEOUT_ENV, "2.5")
    assert sources.client_options() == {"timeout": 2.5, "retries": 0, "retry_time": 10.0}
    monkeypatch.setenv(sources.TIMEOUT_ENV, "soon")
    with pytest.raises(LazyshimError, match="LAZYSHIM_REGISTRY_TIMEOUT"):
        sources.client_options()


def test_other_fixture_helper_is_used() -> None:
    ti, data = other("d", tarfile.DIRTYPE)
    assert ti.isdir() and data is None
