"""A whole pull behind a bearer-token registry (httpx.MockTransport): the layers go side by
side, yet the pull asks the token server once, and each small layer costs one range request."""

from __future__ import annotations

import hashlib
import json
import tarfile
import threading
from pathlib import Path

import httpx
import pytest

from shim.formats import estargz
from shim.formats.estargz_writer import build_estargz
from shim.pull import pull
from shim.registry import RegistryClient
from shim.store.layout import Store

HOST = "reg.example"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _image(layers: int) -> tuple[bytes, dict[str, bytes]]:
    blobs: dict[str, bytes] = {}
    descs = []
    for i in range(layers):
        ti = tarfile.TarInfo(f"f{i}")
        ti.size = 3
        lay = build_estargz([(ti, b"%03d" % i)])
        blobs[_sha(lay.blob)] = lay.blob
        descs.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": _sha(lay.blob),
                      "size": len(lay.blob), "annotations": {estargz.TOC_DIGEST_ANNOTATION: lay.toc_digest}})
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    blobs[_sha(config)] = config
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MT_MANIFEST, "layers": descs,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": _sha(config), "size": len(config)}}).encode()
    return manifest, blobs


def test_a_parallel_pull_asks_for_one_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAZYSHIM_STORE_LAYOUT", "v1")  # placeholder trees on disk: no mount needed
    manifest, blobs = _image(5)
    lock = threading.Lock()
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        with lock:
            seen.append((request.url.host, request.url.path))
        if request.url.host == "auth.example":
            return httpx.Response(200, json={"token": "tok", "expires_in": 300})
        if request.headers.get("authorization") != "Bearer tok":
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.example/token",'
                                                'service="reg",scope="repository:app:pull"'})
        path = request.url.path
        if path == "/v2/app/manifests/1":
            return httpx.Response(200, content=manifest, headers={"Content-Type": MT_MANIFEST})
        digest = path.rsplit("/", 1)[1]
        blob = blobs[digest]
        if "range" not in request.headers:
            return httpx.Response(200, content=blob)
        first, last = map(int, request.headers["range"].removeprefix("bytes=").split("-"))
        return httpx.Response(206, content=blob[first:last + 1],
                              headers={"Content-Range": f"bytes {first}-{last}/{len(blob)}"})

    client = RegistryClient(HOST, transport=httpx.MockTransport(handler), auth_files=[], backoff=0.001)
    with client:
        rec = pull(f"{HOST}/app:1", Store(tmp_path / "store"), client=client)
    assert len(rec.layers) == 5
    assert [h for h, _ in seen].count("auth.example") == 1, seen
    for digest in blobs:
        assert seen.count((HOST, f"/v2/app/blobs/{digest}")) == 1, digest  # config whole, each layer one tail
