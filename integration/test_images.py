"""The test images are what the lazy-pull tests assume they are.

Every later integration test trusts these images: that each variant is in the registry, that the
converters produced real eStargz / zstd:chunked (not silently reused gzip), that the registry's
access log and on-disk blobs can be used for counting and corruption, and that the plain image runs.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.bundle import bundle_from_registry, run_in_bundle
from integration.images import (
    ESGZ_TOC_ANNOTATION,
    HELLO_PY_OUTPUT,
    MT_LAYER_GZIP,
    RANDOM_FILE_SIZE,
    VARIANTS,
    BuildStats,
    build_and_push,
    busybox_spec,
    fetch_blob,
    fetch_manifest,
    write_oci_layout,
)
from integration.registry import Registry

ESTARGZ_FOOTER_SIZE = 51
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MT_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
ZSTD_CHUNKED_KEYS = {
    "io.containers.zstd-chunked.manifest-checksum",
    "io.containers.zstd-chunked.manifest-position",
}
ALL = [f"{n}:{v}" for n in ("busybox", "python") for v in VARIANTS]


def _layers(registry: Registry, key: str) -> list[dict]:
    name, _, tag = key.partition(":")
    return fetch_manifest(registry.host, name, tag)["layers"]


@pytest.mark.parametrize("key", ALL)
def test_every_variant_is_pullable(registry: Registry, images: dict[str, str], key: str) -> None:
    """Manifest, config and layer count are consistent for each pushed variant."""
    assert images[key] == f"{registry.host}/{key}"
    name, _, tag = key.partition(":")
    manifest = fetch_manifest(registry.host, name, tag)
    config = json.loads(fetch_blob(registry.host, name, manifest["config"]["digest"]))
    assert len(manifest["layers"]) == 2
    assert len(config["rootfs"]["diff_ids"]) == 2
    assert config["architecture"] == "amd64"


@pytest.mark.parametrize("name", ["busybox", "python"])
def test_esgz_layers_have_toc_digest_and_footer(
    registry: Registry, images: dict[str, str], name: str
) -> None:
    """Each eStargz layer is annotated with its TOC digest and ends with the 51-byte footer.

    The footer is fetched with a Range request, which also checks that the access log counts
    exactly the bytes the registry served.
    """
    for layer in _layers(registry, f"{name}:esgz"):
        assert layer["mediaType"] == MT_LAYER_GZIP
        assert layer["annotations"][ESGZ_TOC_ANNOTATION].startswith("sha256:")
        digest, size = layer["digest"], layer["size"]
        before = registry.blob_requests(digest)
        footer = fetch_blob(registry.host, name, digest, (size - ESTARGZ_FOOTER_SIZE, size - 1))
        assert len(footer) == ESTARGZ_FOOTER_SIZE
        assert footer[:4] == b"\x1f\x8b\x08\x04"  # gzip member with FEXTRA
        assert b"STARGZ" in footer
        served = registry.bytes_served(digest, min_requests=len(before) + 1)
        assert served - sum(e.size for e in before) == ESTARGZ_FOOTER_SIZE
        assert registry.blob_requests(digest)[-1].status == 206


@pytest.mark.parametrize("variant", ["zstdchunked", "podman-zstdchunked"])
@pytest.mark.parametrize("name", ["busybox", "python"])
def test_zstd_chunked_layers(registry: Registry, images: dict[str, str], name: str, variant: str) -> None:
    """zstd:chunked layers are zstd, carry the chunked annotations, and the annotated manifest
    position points at a zstd frame inside the blob (so the converter did not reuse gzip blobs)."""
    legacy_digests = {layer["digest"] for layer in _layers(registry, f"{name}:legacy")}
    for layer in _layers(registry, f"{name}:{variant}"):
        assert layer["mediaType"] == MT_LAYER_ZSTD
        assert ZSTD_CHUNKED_KEYS <= set(layer["annotations"])
        assert layer["digest"] not in legacy_digests
        head = fetch_blob(registry.host, name, layer["digest"], (0, 3))
        assert head == ZSTD_MAGIC
        offset, length, _ulen, _kind = layer["annotations"][
            "io.containers.zstd-chunked.manifest-position"
        ].split(":")
        assert int(offset) + int(length) <= layer["size"]
        toc = fetch_blob(registry.host, name, layer["digest"], (int(offset), int(offset) + 3))
        assert toc == ZSTD_MAGIC
    if variant == "zstdchunked":  # ctr-remote also writes the eStargz-style TOC digest
        assert all(ESGZ_TOC_ANNOTATION in la["annotations"] for la in _layers(registry, f"{name}:{variant}"))


def test_blob_path_is_the_served_blob(registry: Registry, images: dict[str, str]) -> None:
    """``blob_path`` finds the file the registry serves (tests corrupt bytes there)."""
    layer = _layers(registry, "busybox:esgz")[0]
    data = registry.blob_path("busybox", layer["digest"]).read_bytes()
    assert len(data) == layer["size"]
    assert "sha256:" + hashlib.sha256(data).hexdigest() == layer["digest"]


def test_legacy_build_is_reproducible(registry: Registry, images: dict[str, str], tmp_path: Path) -> None:
    """Writing the busybox image again gives the manifest digest the registry holds."""
    digest = write_oci_layout(busybox_spec(), tmp_path / "layout")
    conn = http.client.HTTPConnection(registry.host, timeout=10)
    conn.request(
        "HEAD",
        "/v2/busybox/manifests/legacy",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert conn.getresponse().getheader("Docker-Content-Digest") == digest


def test_second_push_comes_from_cache(registry: Registry, images: dict[str, str]) -> None:
    """After the session build, everything is in the cache: pushing again builds nothing."""
    stats = BuildStats()
    assert build_and_push(registry, stats=stats) == images
    assert stats.built == []
    assert len(stats.from_cache) == len(ALL)


@pytest.fixture(scope="module")
def python_bundle(images: dict[str, str]) -> Iterator[Path]:
    """The legacy python image unpacked as an OCI bundle (shared by the run tests)."""
    with tempfile.TemporaryDirectory(prefix="lazyshim-bundle-") as tmp:
        yield bundle_from_registry(images["python:legacy"], Path(tmp))


def test_legacy_python_runs_under_runc(python_bundle: Path) -> None:
    """The interpreter, its libraries and ld.so symlink chain are complete in the plain image."""
    result = run_in_bundle(python_bundle, ["python3", "-c", "print(1)"])
    assert (result.returncode, result.stdout, result.stderr) == (0, "1\n", "")


def test_legacy_python_shebang_script(python_bundle: Path) -> None:
    """The kernel resolves ``#!/usr/bin/python3`` (a symlink) inside the image."""
    result = run_in_bundle(python_bundle, ["/usr/local/bin/hello.py"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == HELLO_PY_OUTPUT + "\n"


def test_legacy_busybox_files(images: dict[str, str], tmp_path: Path) -> None:
    """Special members survive the round trip: hardlink, absolute symlink, setuid, empty, large."""
    bundle = bundle_from_registry(images["busybox:legacy"], tmp_path)
    script = (
        "stat -c '%a %s %h' /app/suid-script.sh /app/empty /app/hello.txt /app/random.bin; "
        "cat /app/passwd-abs-link | head -1; /app/hello.sh"
    )
    result = run_in_bundle(bundle, ["/bin/sh", "-c", script], env=["PATH=/bin"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "4755 20 1",
        "644 0 1",
        "644 25 2",
        f"644 {RANDOM_FILE_SIZE} 1",
        "root:x:0:0:root:/root:/bin/sh",
        "hello from busybox sh",
    ]
