"""The pull fetches the config and every layer's TOC side by side: what it asks the (real)
registry for, and that one refused layer among good ones leaves no image behind."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from integration.registry import Registry
from integration.test_image_core import (
    MT_GZIP,
    _sha,
    _ti,
    assert_one_line_failure,
    layer_dirs,
    lazyshim,
    push_image,
)
from shim.formats import estargz
from shim.formats.estargz_writer import build_estargz
from shim.store.layouts import has_meta


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


def _good(tag: str) -> tuple[bytes, str, dict, str]:
    lay = build_estargz([(_ti("d", tarfile.DIRTYPE), None), (_ti(f"d/{tag}"), tag.encode() * 100)])
    return lay.blob, MT_GZIP, {estargz.TOC_DIGEST_ANNOTATION: lay.toc_digest}, lay.diff_id


def test_each_small_layer_costs_one_range_request(registry: Registry, store: Path) -> None:
    layers = [_good(f"one-{i}") for i in range(4)]
    ref = push_image(registry.host, "parallel", "small", layers)
    registry.clear_access_log()
    lazyshim(store, "pull", ref)
    for blob, *_ in layers:
        n = registry.bytes_served(_sha(blob), min_requests=1)
        reqs = registry.blob_requests(_sha(blob))
        assert [e.status for e in reqs] == [206], reqs  # footer and TOC in one tail
        assert n == len(blob)  # a small blob's tail is all of it
    names = lazyshim(store, "images").stdout
    assert "parallel" in names


def test_one_refused_layer_among_good_ones_leaves_no_image(registry: Registry, store: Path) -> None:
    good = [_good(f"good-{i}") for i in range(3)]
    lay = build_estargz([(_ti("x"), b"x")])
    bad = (lay.blob[:-estargz.FOOTER_SIZE] + estargz.footer_bytes(len(lay.blob) * 1000), MT_GZIP,
           {estargz.TOC_DIGEST_ANNOTATION: lay.toc_digest}, lay.diff_id)
    ref = push_image(registry.host, "parallel", "onebad", [good[0], bad, *good[1:]])
    p = lazyshim(store, "pull", ref, check=False)
    assert_one_line_failure(p, "outside")
    assert list((store / "images").iterdir()) == [], "an image record names a layer that is not there"
    assert list((store / "tmp").iterdir()) == [], "a layer was left half-built"
    for d in layer_dirs(store):  # the good layers may be kept (content-addressed), each whole
        assert has_meta(d), d
    assert _sha(bad[0]).split(":")[1] not in {d.name for d in layer_dirs(store)}
    # The same good layers still make a good image.
    lazyshim(store, "pull", push_image(registry.host, "parallel", "allgood", good))
    assert len(layer_dirs(store)) == 3


def test_a_layer_listed_twice_is_pulled_once(registry: Registry, store: Path) -> None:
    one = _good("twice")
    ref = push_image(registry.host, "parallel", "twice", [one, _good("other"), one])
    registry.clear_access_log()
    lazyshim(store, "pull", ref)
    registry.bytes_served(_sha(one[0]), min_requests=1)
    assert len(registry.blob_requests(_sha(one[0]))) == 1
    assert len(layer_dirs(store)) == 2
