"""toc_entries: a TOC document read entry by entry from pieces, as json.loads would read it whole."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shim.formats import tocstream
from shim.formats.toc import FormatError
from shim.formats.tocstream import pieces_of, toc_entries

DOC = json.dumps({"version": 1, "entries": [
    {"name": "./", "type": "dir", "mode": 493},
    {"name": "caf\u00e9/x", "type": "reg", "size": 123456789, "offset": 1, "xattrs": {"user.a": "YQ=="}},
    {"name": "l", "type": "symlink", "linkName": "\u00e9" * 20},
], "other": [1, {"deep": [2, 3]}]}).encode()


def _read(doc: bytes, size: int) -> list:
    return list(toc_entries(pieces_of(doc, size)))


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1 << 20])
def test_any_piece_size_reads_what_json_loads_reads(size: int) -> None:
    assert _read(DOC, size) == json.loads(DOC)["entries"]


def test_version_may_come_after_the_entries_and_whitespace_anywhere() -> None:
    doc = b' \n{ "entries" : [ {"name": "a", "type": "dir"} , {"name": "b", "type": "dir"} ] ,\t"version" : 1 }\n'
    assert [e["name"] for e in _read(doc, 3)] == ["a", "b"]
    assert _read(b'{"version": 1, "entries": []}', 2) == []


@pytest.mark.parametrize("doc", [
    b"", b"[]", b"{", b'{"version": 2, "entries": []}', b'{"version": true, "entries": []}', b"\xff",
    b"[" * 100_000, b'{"version": 1}', b'{"version": 1, "entries": {}}', b'{"version": 1, "entries": [1,]}',
    b'{"version": 1, "entries": [], "entries": []}', b'{"version": 1, "entries": []} x',
    b'{"version": 1 "entries": []}',
    b'{"version": 1, "entries": [{"a": 1}', b'{"version": 1, "entries": [' + b"[" * 100_000 + b"]",
    b'{1: 2}', b'{"version": 1, "entries": ["\xc3"]}',
])
def test_what_is_not_a_toc_is_a_format_error(doc: bytes) -> None:
    for size in (1, 5, 1 << 20):
        with pytest.raises(FormatError):
            _read(doc, size)


def test_a_number_cut_by_a_piece_is_read_whole() -> None:
    doc = b'{"version": 1, "entries": [], "n": 1234567}'
    for size in range(1, len(doc) + 1):
        assert _read(doc, size) == []
    doc = b'{"entries": [], "version": 1' + b"0" * 3 + b"}"  # 1000: not version 1, whatever the cut
    for size in range(1, len(doc) + 1):
        with pytest.raises(FormatError, match="version"):
            _read(doc, size)


def test_one_value_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tocstream, "MAX_VALUE", 1000)
    doc = b'{"version": 1, "entries": [{"name": "' + b"a" * 2000 + b'"}]}'
    with pytest.raises(FormatError, match="larger than"):
        _read(doc, 100)
    assert len(_read(b'{"version": 1, "entries": [' + (b'{"n": "' + b"a" * 900 + b'"},') * 5 + b"{}]}", 100)) == 6


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(1, 50))
def test_arbitrary_bytes_are_entries_or_a_format_error(data: bytes, size: int) -> None:
    try:
        _read(data, size)
    except FormatError:
        pass


def _esgz():
    import tarfile

    from shim.formats import estargz
    from shim.formats.estargz_writer import build_estargz

    items = []
    for i in range(50):
        ti = tarfile.TarInfo(f"d/f{i}")
        items.append((ti, b"x" * i))
    lay = build_estargz(items, level=1)
    off, fsize = estargz.parse_footer(lay.blob[-estargz.FOOTER_SIZE:])
    start, end = estargz.toc_range(len(lay.blob), off, fsize)
    return lay, lay.blob[start:end], off


def test_read_toc_is_parse_toc_of_the_region_and_checks_the_digest() -> None:
    from shim.formats import estargz

    lay, region, off = _esgz()
    assert list(estargz.read_toc(region, off, lay.toc_digest).entries) == list(
        estargz.parse_toc(lay.toc_json, off).entries)
    with pytest.raises(FormatError, match="does not match"):
        estargz.read_toc(region, off, "sha256:" + "0" * 64)


def test_read_toc_reports_a_wrong_digest_before_a_parse_error() -> None:
    import gzip
    import tarfile

    from shim.formats import estargz

    js = b'{"version": 1, "entries": [{"name": "x", "type": "nonsense"}]}'
    ti = tarfile.TarInfo(estargz.TOC_TAR_NAME)
    ti.size = len(js)
    region = gzip.compress(ti.tobuf() + js + bytes(-len(js) % 512) + bytes(1024))
    with pytest.raises(FormatError, match="does not match"):
        estargz.read_toc(region, 10, "sha256:" + "0" * 64)
    with pytest.raises(FormatError, match="unknown type"):
        estargz.read_toc(region, 10, estargz.toc_digest(js))
