"""build_toc: the format-neutral validation every TOC goes through."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim.formats.toc import FormatError, build_toc, normalize_name

D = "sha256:" + "a" * 64
E = "sha256:" + "b" * 64


def reg(name="f", size=10, offset=100, **kw):
    return {"name": name, "type": "reg", "size": size, "offset": offset, "digest": D, **kw}


def test_names_are_normalised():
    assert normalize_name("./a//b/./c/") == "a/b/c"
    assert normalize_name("/abs/x") == "abs/x"
    for bad in ("a/../../etc", "..", "x/..", "", "a\x00b", 5, None, "\ud800"):
        with pytest.raises(FormatError):
            normalize_name(bad)


def test_basic_toc_and_chunk_ends():
    toc = build_toc(
        [
            {"name": "./", "type": "dir", "mode": 0o755},
            {"name": "bin/", "type": "dir", "mode": 0o40755},
            reg("bin/a", 10, 100),
            reg("bin/b", 20, 150),
            {"name": "bin/c", "type": "hardlink", "linkName": "./bin/a"},
            {"name": "bin/l", "type": "symlink", "linkName": "/etc/x"},
        ],
        400,
    )
    names = [e.name for e in toc.entries]
    assert names == ["", "bin", "bin/a", "bin/b", "bin/c", "bin/l"]
    assert toc.entries[1].mode == 0o755
    a, b = toc.entries[2], toc.entries[3]
    assert (a.chunks[0].offset, a.chunks[0].end) == (100, 150)
    assert (b.chunks[0].offset, b.chunks[0].end) == (150, 400)
    assert toc.entries[4].link == "bin/a" and toc.entries[4].size == 10


def test_modtime_parsing():
    toc = build_toc(
        [reg("a", 0, 0, modtime="2023-11-14T22:13:20Z"), reg("b", 0, 0, modtime="2023-11-14T22:13:20")], 1
    )
    assert toc.entries[0].mtime == toc.entries[1].mtime == 1_700_000_000  # naive means UTC
    toc = build_toc([reg("a", 0, 0, modtime="2023-11-14T23:13:20.123456789+01:00")], 1)
    assert toc.entries[0].mtime == 1_700_000_000


def test_estargz_style_chunks():
    toc = build_toc(
        [
            reg("big", 25, 100, chunkSize=10, chunkDigest=E),
            {"name": "big", "type": "chunk", "offset": 200, "chunkOffset": 10, "chunkSize": 10,
             "chunkDigest": E},
            {"name": "big", "type": "chunk", "offset": 300, "chunkOffset": 20},
        ],
        400,
    )
    cs = toc.entries[0].chunks
    assert [(c.offset, c.end, c.file_offset, c.size) for c in cs] == [
        (100, 200, 0, 10),
        (200, 300, 10, 10),
        (300, 400, 20, 5),
    ]


def test_zstdchunked_end_offset_bounds_the_last_chunk():
    # containers/storage puts the FILE's endOffset on the first entry of a chunked file.
    toc = build_toc(
        [
            reg("big", 30, 100, endOffset=250, chunkSize=10, chunkDigest=E),
            {"name": "big", "type": "chunk", "offset": 150, "chunkOffset": 10, "chunkSize": 10,
             "chunkType": "zeros"},
            {"name": "big", "type": "chunk", "offset": 170, "chunkOffset": 20, "chunkSize": 10},
            reg("next", 5, 260, endOffset=270),
        ],
        1000,
    )
    cs = toc.entries[0].chunks
    assert [(c.offset, c.end, c.zeros) for c in cs] == [(100, 150, False), (150, 0, True), (170, 250, False)]
    assert (toc.entries[1].chunks[0].offset, toc.entries[1].chunks[0].end) == (260, 270)


def test_overlay_xattrs_are_dropped():
    toc = build_toc([reg("a", 0, 0, xattrs={"trusted.overlay.opaque": "eQ==", "user.overlay.x": "eQ==",
                                             "security.capability": "AQI="})], 1)
    assert toc.entries[0].xattrs == {"security.capability": b"\x01\x02"}


def test_landmarks():
    toc = build_toc([reg("a", 1, 10), reg(".prefetch.landmark", 1, 20), reg("b", 1, 30)], 40)
    assert toc.prioritized == 1 and [e.name for e in toc.entries] == ["a", "b"]
    toc = build_toc([reg(".no.prefetch.landmark", 1, 20), reg("b", 1, 30)], 40)
    assert toc.no_prefetch and toc.prioritized == 0


@pytest.mark.parametrize(
    "entries",
    [
        [reg("../etc/passwd")],
        [reg("a/../../x")],
        [{"name": "l", "type": "hardlink", "linkName": "later"}, reg("later")],
        [{"name": "l", "type": "hardlink", "linkName": "nowhere"}],
        [{"name": "d", "type": "dir"}, {"name": "l", "type": "hardlink", "linkName": "d"}],
        [{"name": "l", "type": "hardlink", "linkName": "../../etc/shadow"}],
        [reg("a", 10, 10_000)],  # payload beyond the data
        [reg("a", -1)],
        [reg("a", 1 << 50)],
        [reg("a", 10, -5)],
        [reg("a", 10, 100, chunkSize=1 << 31)],
        [reg("a", 20, 100, chunkSize=10), {"name": "a", "type": "chunk", "offset": 200, "chunkOffset": 15}],
        [reg("a", 20, 100, chunkSize=10)],  # chunks do not cover the file
        [reg("a", 10, 100), {"name": "a", "type": "chunk", "offset": 200, "chunkOffset": 10}],  # 0-size chunk
        [{"name": "a", "type": "chunk", "offset": 200}],
        [reg("a"), {"name": "b", "type": "chunk", "offset": 200, "chunkOffset": 10}],
        [reg("a", 10, 100, endOffset=50)],
        [reg("a", 10, 100, endOffset=5000)],
        [reg("a", 10, 100, chunkType="holes")],
        [reg("a", 10, 100, digest=None)],
        [reg("a", 10, 100, digest="md5:00")],
        [reg("a", 10, 100, uid=-1)],
        [reg("a", 10, 100, uid=1.5)],
        [reg("a", 10, 100, mode=True)],
        [reg("a", 10, 100, modtime="yesterday")],
        [reg("a", 10, 100, xattrs={"user.x": "!!!"})],
        [reg("a", 10, 100, xattrs={"user.x": 5})],
        [{"name": "s", "type": "symlink"}],
        [{"name": "x", "type": "socket"}],
        [{"name": "./", "type": "reg", "size": 0}],
        "not a list",
        [5],
    ],
)
def test_hostile_tocs_refused(entries):
    with pytest.raises(FormatError):
        build_toc(entries, 1000)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=20,
)
_keys = st.sampled_from(
    ["name", "type", "size", "offset", "endOffset", "innerOffset", "chunkOffset", "chunkSize", "chunkDigest",
     "chunkType", "digest", "linkName", "mode", "uid", "gid", "modtime", "xattrs", "devMajor", "devMinor"]
)
_values = (
    _json
    | st.sampled_from(["reg", "dir", "chunk", "hardlink", "zeros", D, "a", "../x", "2023-01-01T00:00Z"])
    | st.integers(0, 2000)
)
_entry = st.dictionaries(_keys, _values, max_size=10)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_entry, max_size=8) | _json, st.integers(0, 5000))
def test_random_tocs_only_raise_format_error(entries, end):
    try:
        toc = build_toc(entries, end)
    except FormatError:
        return
    for e in toc.entries:
        for c in e.chunks:
            assert 0 <= c.offset and (c.zeros or c.offset < c.end <= end)
