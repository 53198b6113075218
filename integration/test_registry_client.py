"""RegistryClient against the real Distribution registry (`docker-registry`) on 127.0.0.1.

The registry fixture here is deliberately private and minimal (a temp storage dir, a free
port, wait for /v2/); the shared `integration/registry.py` is someone else's.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from shim.registry import (
    DigestMismatch,
    NotFound,
    PlatformNotFound,
    RegistryClient,
    RegistryError,
    RegistryUnavailable,
)
from shim.registry.manifest import OCI_INDEX, OCI_MANIFEST

REGISTRY_BIN = shutil.which("docker-registry") or "/usr/bin/docker-registry"
pytestmark = pytest.mark.skipif(not os.path.exists(REGISTRY_BIN), reason="docker-registry not installed")

CONFIG = """\
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: 127.0.0.1:{port}
  secret: lazyshim-test-secret
"""


@dataclass
class _Registry:
    """One docker-registry process with its own storage directory."""

    root: Path
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def blob_data_path(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.root / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_registry(tmp: Path) -> _Registry:
    root = tmp / "storage"
    root.mkdir(parents=True, exist_ok=True)
    for _ in range(5):  # the free port can be taken between probe and bind: try again
        port = _free_port()
        cfg = tmp / "config.yml"
        cfg.write_text(CONFIG.format(root=root, port=port))
        with open(tmp / "registry.log", "ab") as log:
            proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=log, stderr=log)
        reg = _Registry(root, port, proc)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://{reg.host}/v2/", timeout=1).status_code == 200:
                    return reg
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        reg.stop()
    raise RuntimeError("docker-registry did not start: " + (tmp / "registry.log").read_text()[-2000:])


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _descriptor(media_type: str, data: bytes, **extra: object) -> dict[str, object]:
    return {"mediaType": media_type, "digest": _digest(data), "size": len(data), **extra}


@dataclass
class _Image:
    repo: str
    layer: bytes
    config: bytes
    manifest_digest: str
    arm_manifest_digest: str
    index_digest: str


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Registry]:
    reg = _start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def image(registry: _Registry) -> _Image:
    """Push a two-platform image (layer + config + 2 manifests + index) with our own client."""
    rnd = random.Random(1234)
    layer = rnd.randbytes(3 * 1024 * 1024 + 17)
    arm_layer = rnd.randbytes(4096)
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
    arm_config = json.dumps({"architecture": "arm64", "os": "linux", "variant": "v8"}).encode()
    repo = "lazy/test-app"
    with RegistryClient(registry.host) as c:
        for blob in (layer, arm_layer, config, arm_config):
            assert c.push_blob(repo, _digest(blob), blob) is True
        assert c.push_blob(repo, _digest(layer), layer) is False  # already there: skipped

        def manifest(cfg: bytes, lay: bytes) -> bytes:
            doc = {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": _descriptor("application/vnd.oci.image.config.v1+json", cfg),
                "layers": [
                    _descriptor(
                        "application/vnd.oci.image.layer.v1.tar+gzip",
                        lay,
                        annotations={"containerd.io/snapshot/stargz/toc.digest": "sha256:" + "0" * 64},
                    )
                ],
            }
            return json.dumps(doc, indent=1).encode()

        amd = manifest(config, layer)
        arm = manifest(arm_config, arm_layer)
        amd_digest = c.push_manifest(repo, "v1", amd, OCI_MANIFEST)
        arm_digest = c.push_manifest(repo, None, arm, OCI_MANIFEST)
        assert amd_digest == _digest(amd) and arm_digest == _digest(arm)
        index = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    _descriptor(
                        OCI_MANIFEST, arm, platform={"os": "linux", "architecture": "arm64", "variant": "v8"}
                    ),
                    _descriptor(OCI_MANIFEST, amd, platform={"os": "linux", "architecture": "amd64"}),
                ],
            }
        ).encode()
        index_digest = c.push_manifest(repo, "multi", index, OCI_INDEX)
    return _Image(repo, layer, config, amd_digest, arm_digest, index_digest)


@pytest.fixture
def client(registry: _Registry) -> Iterator[RegistryClient]:
    with RegistryClient(registry.host, retries=2, backoff=0.01) as c:
        yield c


def test_scheme_is_http_for_loopback_only() -> None:
    with RegistryClient("127.0.0.1:5000") as c:
        assert c.scheme == "http"
    with RegistryClient("registry.example.com") as c:
        assert c.scheme == "https"
    with RegistryClient("registry.example.com", insecure=True) as c:
        assert c.scheme == "http"


def test_manifest_by_tag_and_digest(client: RegistryClient, image: _Image) -> None:
    m = client.get_manifest(image.repo, "v1")
    assert m.digest == image.manifest_digest
    assert m.media_type == OCI_MANIFEST
    assert _digest(m.raw) == m.digest
    assert m.config.digest == _digest(image.config)
    assert [layer.digest for layer in m.layers] == [_digest(image.layer)]
    assert m.layers[0].size == len(image.layer)
    assert m.layers[0].annotations["containerd.io/snapshot/stargz/toc.digest"] == "sha256:" + "0" * 64
    assert m.index_digest is None
    m2 = client.get_manifest(image.repo, image.manifest_digest)
    assert m2.raw == m.raw and m2.json == m.json


def test_platform_selection_from_index(client: RegistryClient, image: _Image) -> None:
    amd = client.get_manifest(image.repo, "multi")
    assert amd.digest == image.manifest_digest
    assert amd.index_digest == image.index_digest
    arm = client.get_manifest(image.repo, "multi", platform=("linux", "arm64", None))
    assert arm.digest == image.arm_manifest_digest
    arm = client.get_manifest(image.repo, image.index_digest, platform=("linux", "aarch64", "v8"))
    assert arm.digest == image.arm_manifest_digest
    with pytest.raises(PlatformNotFound, match="linux/s390x"):
        client.get_manifest(image.repo, "multi", platform=("linux", "s390x", None))
    index = client.get_index(image.repo, "multi")
    assert index.digest == image.index_digest and len(index.manifests) == 2


def test_get_blob_and_stream_and_size(client: RegistryClient, image: _Image) -> None:
    d = _digest(image.layer)
    assert client.get_blob(image.repo, d, max_size=len(image.layer)) == image.layer
    assert b"".join(client.stream_blob(image.repo, d, chunk_size=100_000)) == image.layer
    assert client.blob_size(image.repo, d) == len(image.layer)
    assert client.has_blob(image.repo, d)
    with pytest.raises(RegistryError, match="limit"):
        client.get_blob(image.repo, d, max_size=1000)


def test_get_range(client: RegistryClient, image: _Image) -> None:
    d = _digest(image.layer)
    n = len(image.layer)
    before = client.request_count
    assert client.get_range(image.repo, d, 100, 200) == image.layer[100:200]
    assert client.request_count == before + 1  # one request, answered 206
    assert client.get_range(image.repo, d, 0, 1) == image.layer[:1]
    assert client.get_range(image.repo, d, n - 5, n) == image.layer[-5:]
    assert client.get_range(image.repo, d, 7, 7) == b""
    with pytest.raises(RegistryError, match="416|short read|Content-Range"):
        client.get_range(image.repo, d, n - 5, n + 10)
    with pytest.raises(ValueError):
        client.get_range(image.repo, d, 10, 5)


def test_get_ranges_coalesces(client: RegistryClient, image: _Image) -> None:
    d = _digest(image.layer)
    ranges = [(5000, 5100), (0, 10), (10, 20), (30, 40), (4990, 5010), (2_000_000, 2_000_001), (50, 50)]
    before = client.request_count
    got = client.get_ranges(image.repo, d, ranges, gap=64)
    assert got == [image.layer[s:e] for s, e in ranges]
    # (0,10)+(10,20)+(30,40) | (4990,5100) | (2000000,2000001): 3 requests for 6 non-empty ranges
    assert client.request_count - before == 3
    before = client.request_count
    assert client.get_ranges(image.repo, d, ranges, gap=0) == got
    assert client.request_count - before == 4  # adjacent and overlapping ranges still merge


def test_not_found(client: RegistryClient, image: _Image) -> None:
    missing = "sha256:" + "ab" * 32
    with pytest.raises(NotFound) as exc:
        client.get_blob(image.repo, missing, max_size=10)
    msg = str(exc.value)
    assert msg.startswith(f"registry {client.registry}: blob sha256:abababababab… in {image.repo}")
    assert "(404" in msg and "\n" not in msg
    with pytest.raises(NotFound):
        client.get_range(image.repo, missing, 0, 10)
    with pytest.raises(NotFound):
        client.get_manifest(image.repo, "no-such-tag")
    with pytest.raises(NotFound):
        client.get_manifest("lazy/no-such-repo", "v1")
    with pytest.raises(NotFound):
        client.blob_size(image.repo, missing)
    assert client.has_blob(image.repo, missing) is False


def test_digest_mismatch_detected(client: RegistryClient, registry: _Registry) -> None:
    repo = "lazy/corrupt"
    blob = random.Random(7).randbytes(300_000)
    d = _digest(blob)
    client.push_blob(repo, d, blob)
    path = registry.blob_data_path(d)
    data = bytearray(path.read_bytes())
    data[123_456] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch):
        client.get_blob(repo, d, max_size=len(blob))
    chunks: list[bytes] = []
    with pytest.raises(DigestMismatch):
        for chunk in client.stream_blob(repo, d, chunk_size=65536):
            chunks.append(chunk)
    assert sum(map(len, chunks)) == len(blob)  # the error comes after the last chunk
    # A range cannot be verified here (callers check TOC chunk digests), but it is the served bytes.
    assert client.get_range(repo, d, 123_456, 123_457) == bytes([blob[123_456] ^ 0xFF])


def test_push_chunked_from_path_and_mount(client: RegistryClient, image: _Image, tmp_path: Path) -> None:
    blob = random.Random(99).randbytes(300_001)
    d = _digest(blob)
    f = tmp_path / "blob"
    f.write_bytes(blob)
    before = client.request_count
    assert client.push_blob("lazy/chunked", d, f, chunk_size=64 * 1024) is True
    # HEAD + POST + 5 PATCH + PUT
    assert client.request_count - before == 8
    assert client.get_blob("lazy/chunked", d, max_size=len(blob)) == blob
    # A wrong digest is refused before the upload is committed.
    f.write_bytes(blob[:-1] + b"x")
    bad = _digest(blob + b"other")
    with pytest.raises(DigestMismatch):
        client.push_blob("lazy/chunked", bad, f, chunk_size=64 * 1024)
    assert not client.has_blob("lazy/chunked", bad)
    with pytest.raises(DigestMismatch):
        client.push_blob("lazy/chunked", bad, blob)
    # Cross-repository mount: no bytes move.
    layer = _digest(image.layer)
    assert client.push_blob("lazy/mounted", layer, image.layer, mount_from=image.repo) is False
    assert client.has_blob("lazy/mounted", layer)


def test_concurrent_get_range(registry: _Registry, image: _Image) -> None:
    d = _digest(image.layer)
    n = len(image.layer)
    rnd = random.Random(5)
    jobs = []
    for _ in range(512):
        s = rnd.randrange(0, n - 1)
        jobs.append((s, min(n, s + rnd.randrange(1, 200_000))))
    with RegistryClient(registry.host) as c, ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda r: c.get_range(image.repo, d, *r), jobs))
        assert c.request_count == len(jobs)
    for (s, e), data in zip(jobs, results, strict=True):
        assert data == image.layer[s:e]


def test_registry_stopped_is_unavailable(tmp_path: Path) -> None:
    reg = _start_registry(tmp_path)
    blob = b"hello lazy world"
    try:
        with RegistryClient(reg.host, retries=2, backoff=0.01) as c:
            c.push_blob("lazy/gone", _digest(blob), blob)
            assert c.get_range("lazy/gone", _digest(blob), 0, 5) == b"hello"
            reg.stop()
            t0 = time.monotonic()
            before = c.request_count
            with pytest.raises(RegistryUnavailable) as exc:
                c.get_range("lazy/gone", _digest(blob), 0, 5)
            assert time.monotonic() - t0 < 2.0
            assert c.request_count - before == 3  # first try + 2 retries
            msg = str(exc.value)
            assert msg.startswith(f"registry {reg.host}: blob ") and "3 attempts" in msg and "\n" not in msg
            with pytest.raises(RegistryUnavailable):
                c.get_manifest("lazy/gone", "latest")
    finally:
        reg.stop()
