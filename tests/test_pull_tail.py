"""The pull's first request for an eStargz layer: one tail of the blob that usually holds both
the footer and the TOC, a second request only for the part of a big TOC before the tail, and
hostile footers refused before anything more is fetched.  A recording stand-in for the
registry serves the blob's bytes (pure: no network)."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest

from shim.formats import estargz
from shim.formats.estargz_writer import EstargzLayer, build_estargz
from shim.formats.toc import FormatError
from shim.pull import MAX_TAIL, MIN_TAIL, _estargz_meta, tail_size
from shim.registry.client import Descriptor
from shim.registry.reference import parse_reference

REF = parse_reference("127.0.0.1:5000/t:1")
MT = "application/vnd.oci.image.layer.v1.tar+gzip"


class Blobs:
    """get_range over an in-memory blob (or a sparse one: zeros, then `tail`), recording requests."""

    def __init__(self, blob: bytes = b"", size: int | None = None, tail: bytes = b"") -> None:
        self.blob, self.tail = blob, tail
        self.size = len(blob) if size is None else size
        self.requests: list[tuple[int, int]] = []

    def get_range(self, repository: str, digest: str, start: int, end: int) -> bytes:
        assert 0 <= start < end <= self.size, (start, end)
        self.requests.append((start, end))
        if self.blob:
            return self.blob[start:end]
        tail_start = self.size - len(self.tail)
        head = bytes(max(0, min(end, tail_start) - start))
        return head + self.tail[max(0, start - tail_start):end - tail_start]


def _layer(files: int, payload: int = 16) -> EstargzLayer:
    entries = []
    for i in range(files):
        ti = tarfile.TarInfo(f"d{i % 50}/f{i}")
        data = (b"%d" % i) * payload
        ti.size = len(data)
        entries.append((ti, data))
    dirs = []
    for j in range(min(files, 50)):
        ti = tarfile.TarInfo(f"d{j}")
        ti.type = tarfile.DIRTYPE
        dirs.append((ti, None))
    return build_estargz(dirs + entries, level=1)


def _desc(blob_size: int, toc_digest: str) -> Descriptor:
    return Descriptor(MT, "sha256:" + "ab" * 32, blob_size, {estargz.TOC_DIGEST_ANNOTATION: toc_digest})


def test_tail_size_is_bounded() -> None:
    assert tail_size(100) == 100
    assert tail_size(1 << 20) == MIN_TAIL
    assert tail_size(10 << 20) == (10 << 20) // 100
    assert tail_size(10 << 30) == MAX_TAIL


def test_a_small_layer_costs_one_request_for_footer_and_toc() -> None:
    lay = _layer(20)
    client = Blobs(lay.blob)
    meta = _estargz_meta(client, REF, _desc(len(lay.blob), lay.toc_digest))
    assert client.requests == [(max(0, len(lay.blob) - MIN_TAIL), len(lay.blob))]
    assert len(meta.toc.entries) == len(estargz.parse_toc(lay.toc_json, len(lay.blob)).entries)


def test_a_toc_bigger_than_the_tail_costs_one_more_request_for_what_is_missing() -> None:
    lay = _layer(4000, payload=400)  # a TOC of a few hundred KiB, compressed
    size = len(lay.blob)
    toc_offset, _ = estargz.parse_footer(lay.blob[-estargz.FOOTER_SIZE:])
    tail_start = size - tail_size(size)
    assert toc_offset < tail_start, "the test needs a TOC that begins before the tail"
    client = Blobs(lay.blob)
    meta = _estargz_meta(client, REF, _desc(size, lay.toc_digest))
    assert client.requests == [(tail_start, size), (toc_offset, tail_start)]
    assert [e.name for e in meta.toc.entries] == [e.name for e in estargz.parse_toc(lay.toc_json, toc_offset).entries]


def test_a_wrong_toc_digest_is_refused_whether_or_not_the_toc_fits_the_tail() -> None:
    for files in (20, 4000):
        lay = _layer(files, payload=400)
        with pytest.raises(FormatError, match="does not match"):
            _estargz_meta(Blobs(lay.blob), REF, _desc(len(lay.blob), "sha256:" + "00" * 32))


def test_a_footer_pointing_outside_the_blob_is_refused_after_the_tail_alone() -> None:
    lay = _layer(20)
    blob = lay.blob[:-estargz.FOOTER_SIZE] + estargz.footer_bytes(len(lay.blob) * 1000)
    client = Blobs(blob)
    with pytest.raises(FormatError, match="outside the blob"):
        _estargz_meta(client, REF, _desc(len(blob), lay.toc_digest))
    assert len(client.requests) == 1


def test_a_toc_bigger_than_the_bound_is_refused_before_it_is_fetched() -> None:
    size = estargz.MAX_TOC_COMPRESSED + (8 << 20)  # never allocated: the stand-in serves zeros
    client = Blobs(size=size, tail=estargz.footer_bytes(1))
    with pytest.raises(FormatError, match="limit"):
        _estargz_meta(client, REF, _desc(size, "sha256:" + "00" * 32))
    assert client.requests == [(size - MAX_TAIL, size)]


def test_a_blob_that_is_not_estargz_is_a_format_error() -> None:
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w:gz") as tf:
        ti = tarfile.TarInfo("x")
        tf.addfile(ti, io.BytesIO(b""))
    data = blob.getvalue()
    with pytest.raises(FormatError, match="no stargz footer"):
        _estargz_meta(Blobs(data), REF, _desc(len(data), "sha256:" + hashlib.sha256(b"").hexdigest()))
