"""Manifests and indexes with fields of the wrong type: a one-line ManifestInvalid, never a
traceback (a registry is untrusted input, and `lazyshim pull` prints what it raises)."""

from __future__ import annotations

import copy
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim.formats.toc import FormatError
from shim.pull import layer_format
from shim.registry.errors import ManifestInvalid, RegistryError
from shim.registry.manifest import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Index,
    Manifest,
    compute_digest,
    parse_manifest_document,
    select_platform,
)

D = "sha256:" + "ab" * 32
LAYER = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D, "size": 10,
         "annotations": {"containerd.io/snapshot/stargz/toc.digest": D}}
MANIFEST = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D, "size": 2},
            "layers": [LAYER, {**LAYER, "mediaType": "application/vnd.oci.image.layer.v1.tar+zstd",
                               "annotations": {"io.github.containers.zstd-chunked.manifest-position": "1:2:3:1",
                                               "io.github.containers.zstd-chunked.manifest-checksum": D}}]}
INDEX = {"schemaVersion": 2, "mediaType": OCI_INDEX,
         "manifests": [{"mediaType": OCI_MANIFEST, "digest": D, "size": 5,
                        "platform": {"os": "linux", "architecture": "amd64"}}]}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _paths(doc, prefix=()):
    """Every (container, key) position in a JSON document."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for k, v in items:
        yield prefix + (k,)
        yield from _paths(v, prefix + (k,))


def _replace(doc, path, value):
    out = copy.deepcopy(doc)
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return out


def _check(doc_or_raw, content_type: str | None = None) -> None:
    raw = doc_or_raw if isinstance(doc_or_raw, bytes) else json.dumps(doc_or_raw).encode()
    try:
        doc = parse_manifest_document(raw, compute_digest(raw), content_type, "manifest t")
    except ManifestInvalid as e:
        assert "\n" not in str(e) and str(e).startswith("manifest t")
        return
    # What parsed must be usable by the code that comes next, with only its own errors.
    if isinstance(doc, Manifest):
        for layer in doc.layers:
            try:
                layer_format(layer)
            except FormatError:
                pass
    else:
        assert isinstance(doc, Index)
        try:
            select_platform(doc, ("linux", "amd64", None), "index t")
        except RegistryError:
            pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(_paths(MANIFEST))), json_values)
def test_manifest_field_of_any_type(path, value) -> None:
    _check(_replace(MANIFEST, path, value))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(_paths(INDEX))), json_values)
def test_index_field_of_any_type(path, value) -> None:
    _check(_replace(INDEX, path, value))


@settings(deadline=None)
@given(json_values, st.sampled_from([None, OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, "text/plain"]))
def test_any_json_document(value, content_type) -> None:
    _check(value, content_type)


def test_deeply_nested_json_is_refused_in_one_line() -> None:
    for raw in (b"[" * 200_000 + b"]" * 200_000, b'{"schemaVersion": 2, "layers": ' + b"[" * 100_000):
        _check(raw)
        try:
            parse_manifest_document(raw, compute_digest(raw), None, "manifest t")
        except ManifestInvalid:
            continue
        raise AssertionError("accepted")


def test_lone_surrogates_and_controls_stay_out_of_messages() -> None:
    doc = _replace(MANIFEST, ("mediaType",), "bad\ud800\n\x1b[31mtype")
    raw = json.dumps(doc).encode()
    try:
        parse_manifest_document(raw, compute_digest(raw), None, "manifest t")
    except ManifestInvalid as e:
        str(e).encode("utf-8")  # printable on any terminal: no lone surrogate, no escape sequence
        assert "\x1b" not in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("accepted")
