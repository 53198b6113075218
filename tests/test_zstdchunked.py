"""zstd:chunked: current writer round trip, old/interim generations, hostile input."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import tarfile

import pytest
import zstandard
from conftest import contents, sample_entries
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim.formats import zstdchunked as Z
from shim.formats.estargz_writer import TAR_TRAILER, tar_header, tar_padding
from shim.formats.toc import FormatError
from shim.formats.zstdchunked_writer import build_zstdchunked, crc64_iso, skippable_frame


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def unzstd(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read(1 << 30)


def read_layer(blob: bytes, loc: Z.TocLocation):
    toc_json = Z.decode_manifest(blob[loc.offset - 8 : loc.offset + loc.length], loc)
    return toc_json, Z.parse_toc(toc_json, loc.data_end)


def file_bytes(blob: bytes, entry) -> bytes:
    return b"".join(Z.decode_chunk(c, blob[c.offset : c.end]) for c in entry.chunks)


@pytest.fixture(scope="module")
def layer():
    ents = sample_entries()
    return ents, build_zstdchunked(ents, chunk_size=64 * 1024, level=1)


def test_round_trip_from_annotations_and_footer(layer):
    ents, L = layer
    loc = Z.manifest_location(L.annotations)
    assert loc.generation == Z.CURRENT and loc.checksum == sha(L.blob[loc.offset : loc.offset + loc.length])
    foot = Z.parse_footer(L.blob[-Z.FOOTER_FETCH_SIZE :], blob_size=len(L.blob))
    assert foot.footer_size == 64 and foot.checksum is None
    assert (foot.offset, foot.length) == (loc.offset, loc.length)
    assert foot.uncompressed_length == loc.uncompressed_length
    assert (foot.tarsplit_offset, foot.tarsplit_length) == (loc.tarsplit_offset, loc.tarsplit_length)
    for where in (loc, foot):
        toc_json, toc = read_layer(L.blob, where)
        assert toc_json == L.toc_json
    # the region may also start at the manifest itself
    assert Z.decode_manifest(L.blob[loc.offset :], loc) == L.toc_json
    by_name = {e.name: e for e in toc.entries}
    for name, data in contents(ents).items():
        e = by_name[name]
        assert e.size == len(data) and e.digest == (sha(data) if data else None)
        assert file_bytes(L.blob, e) == data
        for c in e.chunks:
            assert c.digest is None or c.digest == sha(data[c.file_offset : c.file_offset + c.size])
            assert c.zeros or L.blob[c.offset : c.offset + 4] == Z.ZSTD_MAGIC
    zeros = by_name["bin/zeros"].chunks
    assert [c.zeros for c in zeros] == [True, True, True, False]
    assert by_name["bin/ash"].link == "bin/sh" and by_name["dev/null"].dev_major == 1
    assert by_name["etc/cap"].xattrs == {"security.capability": b"\x01\x02"}


def test_end_offset_makes_tight_ranges(layer):
    _, L = layer
    doc = json.loads(L.toc_json)
    sh = next(e for e in doc["entries"] if e["name"] == "bin/sh")
    assert sh["chunkSize"] == 65536 and sh["endOffset"] > sh["offset"]
    toc = Z.parse_toc(L.toc_json, Z.manifest_location(L.annotations).data_end)
    chunks = next(e for e in toc.entries if e.name == "bin/sh").chunks
    assert chunks[0].end == chunks[1].offset and chunks[-1].end == sh["endOffset"]


def test_blob_is_a_zstd_stream_of_the_layer_tar(layer):
    ents, L = layer
    raw = unzstd(L.blob)  # skippable frames (manifest, tar-split, footer) are skipped
    assert len(raw) == L.uncompressed_size and sha(raw) == L.diff_id
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        for ti, data in ents:
            if ti.isreg():
                assert tf.extractfile(ti.name).read() == data


def test_tar_split_reassembles_the_tar(layer):
    ents, L = layer
    loc = Z.manifest_location(L.annotations)
    ts_c = L.blob[loc.tarsplit_offset : loc.tarsplit_offset + loc.tarsplit_length]
    assert Z.unwrap_skippable(L.blob[loc.tarsplit_offset - 8 :])[: len(ts_c)] == ts_c
    assert Z.tarsplit_digest(L.toc_json) == sha(ts_c)
    lines = unzstd(ts_c).splitlines()
    assert len(unzstd(ts_c)) == loc.tarsplit_uncompressed_length
    files = contents(ents)
    out = bytearray()
    for i, line in enumerate(lines):
        e = json.loads(line)
        assert e["position"] == i
        if e["type"] == 2:
            out += base64.b64decode(e["payload"])
        else:
            data = files.get(e["name"].rstrip("/"), b"")
            assert e.get("size", 0) == len(data)
            if data:
                assert base64.b64decode(e["payload"]) == crc64_iso(data)
                out += data
    assert sha(bytes(out)) == L.diff_id


def test_crc64_matches_go():
    assert crc64_iso(b"123456789").hex() == "b90956c775a41001"


# --- the old (stargz-snapshotter / podman 4.3.1) and interim generations ---------------------


def old_generation_blob(ents, footer_kind="old"):
    """What stargz-snapshotter's zstdchunked writer lays out: frames per payload, an
    estargz-style TOC in a skippable frame, then a 40-byte footer in a skippable frame."""
    cctx = zstandard.ZstdCompressor(level=1)
    out = bytearray()
    pending = bytearray()
    entries = []
    pad = b""
    for ti, data in ents:
        data = data or b""
        ti.size = len(data) if ti.isreg() else 0
        pending += pad + tar_header(ti)
        e = {"name": ti.name, "type": {b"0": "reg", b"5": "dir"}.get(ti.type, "reg" if ti.isreg() else "dir")}
        if not (ti.isreg() or ti.isdir()):
            continue
        entries.append(e)
        pad = tar_padding(len(data))
        if data:
            out += cctx.compress(bytes(pending))
            pending.clear()
            e.update(size=len(data), offset=len(out), digest=sha(data), chunkDigest=sha(data))
            pending += data
    pending += pad + TAR_TRAILER
    out += cctx.compress(bytes(pending))
    toc_json = json.dumps({"version": 1, "entries": entries}, indent="\t").encode()
    toc_c = cctx.compress(toc_json)
    toc_off = len(out) + 8
    out += skippable_frame(toc_c)
    fields = struct.pack("<4Q", toc_off, len(toc_c), len(toc_json), 1)
    if footer_kind == "old":
        out += skippable_frame(fields + Z.OLD_MAGIC)
        annotations = {
            Z.OLD_CHECKSUM_ANNOTATION: sha(toc_c),
            Z.OLD_POSITION_ANNOTATION: f"{toc_off}:{len(toc_c)}:{len(toc_json)}:1",
        }
    else:  # containers/storage 1.47-1.49
        out += skippable_frame(fields + Z.OLD_MAGIC + bytes(16))
        annotations = {
            Z.CHECKSUM_ANNOTATION: sha(toc_c),
            Z.POSITION_ANNOTATION: f"{toc_off}:{len(toc_c)}:{len(toc_json)}:1",
        }
    return bytes(out), annotations, toc_json


@pytest.mark.parametrize("kind, gen, size", [("old", Z.OLD, 40), ("interim", Z.INTERIM, 56)])
def test_older_generations(kind, gen, size):
    ents = [(ti, d) for ti, d in sample_entries() if ti.isreg() or ti.isdir()]
    blob, annotations, toc_json = old_generation_blob(ents, kind)
    loc = Z.manifest_location(annotations)
    assert loc.generation == (Z.OLD if kind == "old" else Z.CURRENT)
    foot = Z.parse_footer(blob[-72:], blob_size=len(blob))
    assert foot.generation == gen and foot.footer_size == size
    assert (foot.offset, foot.length) == (loc.offset, loc.length)
    got, toc = read_layer(blob, loc)
    assert got == toc_json
    by_name = {e.name: e for e in toc.entries}
    for name, data in contents(ents).items():
        assert file_bytes(blob, by_name[name]) == data
    assert len(unzstd(blob)) > 0


def test_current_annotations_win():
    ann = {
        Z.OLD_POSITION_ANNOTATION: "100:10:20:1",
        Z.POSITION_ANNOTATION: "200:10:20:1",
        Z.TARSPLIT_POSITION_ANNOTATION: "218:5:9",
    }
    loc = Z.manifest_location(ann)
    assert (loc.offset, loc.generation, loc.checksum, loc.tarsplit_offset) == (200, Z.CURRENT, None, 218)
    assert Z.manifest_location({"org.opencontainers.image.title": "x"}) is None


@pytest.mark.parametrize(
    "ann",
    [
        {Z.POSITION_ANNOTATION: "1:2:3"},
        {Z.POSITION_ANNOTATION: "100:10:20:2"},  # manifest type
        {Z.POSITION_ANNOTATION: "100:-10:20:1"},
        {Z.POSITION_ANNOTATION: " 100:10:20:1"},
        {Z.POSITION_ANNOTATION: "4:10:20:1"},  # no room for the frame header
        {Z.POSITION_ANNOTATION: "100:0:20:1"},
        {Z.POSITION_ANNOTATION: f"100:10:{(256 << 20) + 1}:1"},  # > 256 MiB uncompressed
        {Z.POSITION_ANNOTATION: f"100:{1 << 40}:20:1"},
        {Z.POSITION_ANNOTATION: "1" * 30 + ":10:20:1"},
        {Z.POSITION_ANNOTATION: "100:10:20:1", Z.CHECKSUM_ANNOTATION: "sha256:xyz"},
        {Z.POSITION_ANNOTATION: "100:10:20:1", Z.TARSPLIT_POSITION_ANNOTATION: "1:2"},
        {Z.POSITION_ANNOTATION: 5},
    ],
)
def test_bad_annotations(ann):
    with pytest.raises(FormatError):
        Z.manifest_location(ann)


def test_manifest_checks(layer):
    _, L = layer
    loc = Z.manifest_location(L.annotations)
    region = L.blob[loc.offset - 8 : loc.offset + loc.length]
    with pytest.raises(FormatError, match="checksum"):
        Z.decode_manifest(region, Z.TocLocation(loc.offset, loc.length, loc.uncompressed_length,
                                                "sha256:" + "0" * 64, Z.CURRENT))
    for ulen in (loc.uncompressed_length - 1, loc.uncompressed_length + 1):
        with pytest.raises(FormatError):
            Z.decode_manifest(region, Z.TocLocation(loc.offset, loc.length, ulen, loc.checksum, Z.CURRENT))
    with pytest.raises(FormatError, match="truncated"):
        Z.decode_manifest(region[:-1], loc)
    bad_header = region[:4] + struct.pack("<I", loc.length + 1) + region[8:]
    with pytest.raises(FormatError):
        Z.decode_manifest(bad_header, loc)


def test_zstd_bomb_manifest_refused():
    bomb = zstandard.ZstdCompressor(level=19).compress(bytes(64 << 20))
    assert len(bomb) < 10_000
    loc = Z.TocLocation(8, len(bomb), 1000, sha(bomb), Z.CURRENT)
    with pytest.raises(FormatError, match="beyond"):
        Z.decode_manifest(bomb, loc)
    with pytest.raises(FormatError):
        Z.decode_manifest(bomb, Z.TocLocation(8, len(bomb), (256 << 20) + 1, None, Z.CURRENT))


def test_decode_frame_bounds():
    frame = zstandard.ZstdCompressor().compress(b"0123456789" * 100)
    assert Z.decode_frame(frame, 5, 3) == b"567"
    assert Z.decode_frame(frame, 0, 0) == b""
    for args in ((995, 10), (-1, 3), (0, 1 << 40)):
        with pytest.raises(FormatError):
            Z.decode_frame(frame, *args)
    with pytest.raises(FormatError):
        Z.decode_frame(b"not zstd at all", 0, 4)
    with pytest.raises(FormatError):
        Z.decode_frame(frame[:-3], 0, 1000)


def test_footer_variants_refused():
    good = struct.pack("<7Q", 100, 10, 20, 1, 0, 0, 0) + Z.MAGIC
    assert Z.parse_footer(good).offset == 100
    assert Z.parse_footer(skippable_frame(good)).footer_size == 64
    for bad in (
        good[:-1] + b"y",
        struct.pack("<7Q", 100, 10, 20, 2, 0, 0, 0) + Z.MAGIC,
        struct.pack("<7Q", 100, 0, 20, 1, 0, 0, 0) + Z.MAGIC,
        b"\x50\x2a\x4d\x18" + struct.pack("<I", 63) + good,  # wrong frame size
        b"x" * 30,
    ):
        with pytest.raises(FormatError):
            Z.parse_footer(bad)
    with pytest.raises(FormatError, match="outside"):
        Z.parse_footer(good, blob_size=90)


# --- properties ------------------------------------------------------------------------------

_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_GOOD = build_zstdchunked(sample_entries()[:6], chunk_size=100_000, level=1)
_LOC = Z.manifest_location(_GOOD.annotations)
_REGION = _GOOD.blob[_LOC.offset - 8 : _LOC.offset + _LOC.length]
_edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=6)


def mutate(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    return bytes(b)


@_SETTINGS
@given(st.binary(max_size=150), st.none() | st.integers(0, 1 << 40))
def test_random_footer_bytes(data, blob_size):
    try:
        Z.parse_footer(data, blob_size=blob_size)
    except FormatError:
        pass


@_SETTINGS
@given(_edits)
def test_mutated_footer(edits):
    try:
        loc = Z.parse_footer(mutate(_GOOD.blob[-72:], edits), blob_size=len(_GOOD.blob))
        Z.decode_manifest(_GOOD.blob[loc.offset : loc.offset + loc.length], loc)
    except FormatError:
        pass


@_SETTINGS
@given(st.dictionaries(st.sampled_from([Z.POSITION_ANNOTATION, Z.OLD_POSITION_ANNOTATION,
                                        Z.CHECKSUM_ANNOTATION, Z.TARSPLIT_POSITION_ANNOTATION, "x"]),
                       st.text(alphabet="0123456789:-+ sha256abcdef", max_size=40)))
def test_random_annotations(ann):
    try:
        Z.manifest_location(ann)
    except FormatError:
        pass


@_SETTINGS
@given(_edits, st.integers(0, 40), st.booleans())
def test_mutated_manifest_region(edits, cut, keep_checksum):
    loc = _LOC if keep_checksum else Z.TocLocation(_LOC.offset, _LOC.length, _LOC.uncompressed_length,
                                                    None, Z.CURRENT)
    try:
        toc_json = Z.decode_manifest(mutate(_REGION, edits)[: len(_REGION) - cut], loc)
        Z.parse_toc(toc_json, loc.data_end)
    except FormatError:
        pass


@_SETTINGS
@given(_edits)
def test_mutated_toc_json(edits):
    try:
        Z.parse_toc(mutate(_GOOD.toc_json, edits), _LOC.data_end)
        Z.tarsplit_digest(mutate(_GOOD.toc_json, edits))
    except FormatError:
        pass


@_SETTINGS
@given(st.binary(max_size=300), st.integers(0, 1 << 12), st.integers(0, 1 << 12))
def test_random_frames(data, inner, size):
    try:
        Z.decode_frame(data, inner, size)
    except FormatError:
        pass
    try:
        Z.unwrap_skippable(data)
    except FormatError:
        pass
