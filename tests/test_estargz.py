"""eStargz: our writer's blobs read back through the reader, plus hostile input."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import struct
import tarfile
import zlib

import pytest
from conftest import contents, sample_entries
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim.formats import estargz
from shim.formats.estargz_writer import build_estargz
from shim.formats.toc import FormatError


def read_layer(blob: bytes):
    off, fsize = estargz.parse_footer(blob[-estargz.FOOTER_SIZE :])
    start, end = estargz.toc_range(len(blob), off, fsize)
    toc_json = estargz.toc_json_from_region(blob[start:end])
    return toc_json, estargz.parse_toc(toc_json, off)


def file_bytes(blob: bytes, entry) -> bytes:
    return b"".join(
        estargz.decode_member(blob[c.offset : c.end], c.inner_offset, c.size) for c in entry.chunks
    )


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def layer():
    ents = sample_entries()
    return ents, build_estargz(ents, chunk_size=64 * 1024, level=1)


def test_round_trip(layer):
    ents, L = layer
    toc_json, toc = read_layer(L.blob)
    assert toc_json == L.toc_json
    assert estargz.toc_digest(toc_json) == L.toc_digest == sha(toc_json)
    want = contents(ents)
    by_name = {e.name: e for e in toc.entries}
    for name, data in want.items():
        e = by_name[name]
        assert e.size == len(data) and e.digest == (sha(data) if data else None)
        assert file_bytes(L.blob, e) == data
        for c in e.chunks:
            assert c.digest == sha(data[c.file_offset : c.file_offset + c.size])
    assert len(by_name["bin/sh"].chunks) == 5  # 300 000 bytes in 64 KiB chunks
    assert by_name["bin/ash"].type == "hardlink" and by_name["bin/ash"].link == "bin/sh"
    assert by_name["bin/link"].link == "/bin/sh"
    assert (by_name["dev/null"].dev_major, by_name["dev/null"].dev_minor) == (1, 3)
    assert by_name["etc/cap"].xattrs == {"security.capability": b"\x01\x02"}
    assert by_name["bin/sh"].mode == 0o755 and by_name["bin"].type == "dir"
    assert by_name["etc/passwd"].mtime == 1_700_000_000
    assert toc.prioritized == 0 and not toc.no_prefetch


def test_blob_is_one_gzip_stream_of_the_layer_tar(layer):
    ents, L = layer
    raw = gzip.decompress(L.blob)
    assert len(raw) == L.uncompressed_size and sha(raw) == L.diff_id
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        names = tf.getnames()
        assert names[-1] == "stargz.index.json"
        assert tf.extractfile("stargz.index.json").read() == L.toc_json
        for ti, data in ents:
            if ti.isreg():
                assert tf.extractfile(ti.name).read() == data


def test_every_payload_chunk_starts_a_gzip_member(layer):
    _, L = layer
    doc = json.loads(L.toc_json)
    for e in doc["entries"]:
        if "offset" in e:
            assert L.blob[e["offset"] : e["offset"] + 3] == b"\x1f\x8b\x08"
            assert "innerOffset" not in e


def test_footer_matches_stargz_layout(layer):
    _, L = layer
    f = L.blob[-51:]
    assert f[:4] == b"\x1f\x8b\x08\x04" and f[10:12] == b"\x1a\x00" and f[12:16] == b"SG\x16\x00"
    off = int(f[16:32], 16)
    assert f[32:38] == b"STARGZ" and gzip.decompress(f) == b""
    assert estargz.parse_footer(L.blob[-51:]) == (off, 51)
    assert estargz.parse_footer(L.blob[-200:]) == (off, 51)


def legacy_footer(toc_off: int) -> bytes:
    extra = b"%016xSTARGZ" % toc_off
    header = b"\x1f\x8b\x08\x04" + bytes(4) + b"\x00\xff" + struct.pack("<H", 22) + extra
    return header + b"\x01\x00\x00\xff\xff" + bytes(8)


def test_legacy_47_byte_footer(layer):
    _, L = layer
    off, _ = estargz.parse_footer(L.blob[-51:])
    blob = L.blob[:-51] + legacy_footer(off)
    assert len(legacy_footer(off)) == 47 and gzip.decompress(legacy_footer(off)) == b""
    assert estargz.parse_footer(blob[-51:]) == (off, 47)
    toc_json, toc = read_layer_legacy(blob)
    assert toc_json == L.toc_json


def read_layer_legacy(blob):
    off, fsize = estargz.parse_footer(blob[-51:])
    start, end = estargz.toc_range(len(blob), off, fsize)
    toc_json = estargz.toc_json_from_region(blob[start:end])
    return toc_json, estargz.parse_toc(toc_json, off)


def test_prefetch_landmark_orders_prioritized_files_first():
    ents = sample_entries()
    L = build_estargz(ents, prioritized=["bin/sh", "etc/passwd"], level=1)
    _, toc = read_layer(L.blob)
    names = [e.name for e in toc.entries]
    assert names[:4] == ["bin", "bin/sh", "etc", "etc/passwd"]  # parents pulled in front
    assert toc.prioritized == 2
    raw_names = [e["name"] for e in json.loads(L.toc_json)["entries"]]
    assert raw_names.index(".prefetch.landmark") == 4
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(L.blob))) as tf:
        assert tf.extractfile(".prefetch.landmark").read() == b"\x0f"
        assert tf.getnames()[:5] == ["bin", "bin/sh", "etc", "etc/passwd", ".prefetch.landmark"]


def test_no_prefetch_landmark_and_none():
    L = build_estargz(sample_entries(), prioritized=[], level=1)
    assert json.loads(L.toc_json)["entries"][0]["name"] == ".no.prefetch.landmark"
    _, toc = read_layer(L.blob)
    assert toc.no_prefetch and toc.prioritized == 0
    L = build_estargz(sample_entries(), level=1)
    assert "landmark" not in L.toc_json.decode()
    with pytest.raises(ValueError):
        build_estargz(sample_entries(), prioritized=["nope"])


def test_prioritized_hardlink_pulls_its_target():
    L = build_estargz(sample_entries(), prioritized=["bin/ash"], level=1)
    _, toc = read_layer(L.blob)
    assert [e.name for e in toc.entries][:3] == ["bin", "bin/sh", "bin/ash"]


def test_empty_layer():
    L = build_estargz([], level=1)
    toc_json, toc = read_layer(L.blob)
    assert toc.entries == [] and tarfile.open(fileobj=io.BytesIO(gzip.decompress(L.blob))).getnames() == [
        "stargz.index.json"
    ]


def test_shared_member_inner_offset():
    # stargz-snapshotter's MinChunkSize packs small files into one member: innerOffset.
    member = gzip.compress(b"HEADERhelloworld")
    toc = estargz.parse_toc(
        json.dumps(
            {
                "version": 1,
                "entries": [
                    {"name": "a", "type": "reg", "size": 5, "innerOffset": 6, "digest": sha(b"hello")},
                    {"name": "b", "type": "reg", "size": 5, "innerOffset": 11, "digest": sha(b"world")},
                ],
            }
        ).encode(),
        len(member),
    )
    a, b = toc.entries
    assert file_bytes(member, a) == b"hello" and file_bytes(member, b) == b"world"


def test_decode_member_bounds():
    member = gzip.compress(b"x" * 1000)
    assert estargz.decode_member(member, 0, 0) == b""
    with pytest.raises(FormatError):
        estargz.decode_member(member, 990, 20)
    with pytest.raises(FormatError):
        estargz.decode_member(member, -1, 5)
    with pytest.raises(FormatError):
        estargz.decode_member(b"garbage", 0, 5)


def test_gzip_bomb_in_toc_region_is_refused(monkeypatch):
    monkeypatch.setattr(estargz, "MAX_TOC_UNCOMPRESSED", 1 << 20)
    ti = tarfile.TarInfo("stargz.index.json")
    ti.size = 8 << 20
    bomb_tar = ti.tobuf() + bytes(8 << 20)
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    region = c.compress(bomb_tar) + c.flush()
    assert len(region) < 20_000
    with pytest.raises(FormatError, match="beyond"):
        estargz.toc_json_from_region(region)
    with pytest.raises(FormatError):
        estargz.gunzip_bounded(region, 1000)


def test_toc_range_bounds():
    with pytest.raises(FormatError):
        estargz.toc_range(100, 200, 51)
    with pytest.raises(FormatError):
        estargz.toc_range(200 << 20, 0, 51)  # a 200 MiB "TOC"


def test_region_must_hold_the_toc_entry():
    ti = tarfile.TarInfo("other.json")
    ti.size = 2
    region = gzip.compress(ti.tobuf() + b"{}" + bytes(510 + 1024))
    with pytest.raises(FormatError):
        estargz.toc_json_from_region(region)


def test_parse_toc_rejects_bad_json():
    for bad in (b"", b"[]", b"{", b'{"version": 2, "entries": []}', b"\xff", b"[" * 100_000):
        with pytest.raises(FormatError):
            estargz.parse_toc(bad, 10)


# --- properties: nothing but FormatError, whatever the bytes ---------------------------------

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_GOOD = build_estargz(sample_entries()[:5], chunk_size=100_000, level=1)
_OFF, _ = estargz.parse_footer(_GOOD.blob[-51:])
_REGION = _GOOD.blob[_OFF:-51]


def mutate(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


_edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=6)


@_SETTINGS
@given(st.binary(max_size=120))
def test_random_footer_bytes(data):
    try:
        off, size = estargz.parse_footer(data)
    except FormatError:
        return
    assert size in (47, 51) and off >= 0


@_SETTINGS
@given(_edits)
def test_mutated_footer(edits):
    try:
        off, size = estargz.parse_footer(mutate(_GOOD.blob[-51:], edits))
        estargz.toc_range(len(_GOOD.blob), off, size)
    except FormatError:
        pass


@_SETTINGS
@given(_edits, st.integers(0, len(_REGION)))
def test_mutated_toc_region(edits, cut):
    try:
        toc_json = estargz.toc_json_from_region(mutate(_REGION, edits)[: len(_REGION) - cut])
        estargz.parse_toc(toc_json, _OFF)
    except FormatError:
        pass


@_SETTINGS
@given(st.binary(max_size=600))
def test_random_toc_region(data):
    for region in (data, gzip.compress(data, 1)):
        try:
            estargz.toc_json_from_region(region)
        except FormatError:
            pass


@_SETTINGS
@given(_edits)
def test_mutated_toc_json(edits):
    try:
        estargz.parse_toc(mutate(_GOOD.toc_json, edits), _OFF)
    except FormatError:
        pass


@_SETTINGS
@given(_edits, st.integers(0, 1 << 16), st.integers(0, 1 << 16))
def test_mutated_members(edits, inner, size):
    toc = estargz.parse_toc(_GOOD.toc_json, _OFF)
    c = next(e for e in toc.entries if e.chunks).chunks[0]
    try:
        estargz.decode_member(mutate(_GOOD.blob[c.offset : c.end], edits), inner, size)
    except FormatError:
        pass
