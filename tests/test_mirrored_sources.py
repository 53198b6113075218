"""Fall-through across endpoints (mirrors, then origin) for pulls and fills, against in-process
fake registries (httpx.MockTransport); and which images a container's fills read from."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from shim import endpoints, sources
from shim.registry import DigestMismatch, RegistryClient, RegistryError, RegistryUnavailable
from shim.registry.mirrors import Endpoint
from shim.store import refs
from shim.store.layout import Store
from shim.store.metadata import ImageRecord, dump_image, write_atomic

BLOB = bytes(range(256)) * 64
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture(autouse=True)
def fresh_health(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(endpoints, "_health", endpoints._Health())


def serves(blob: bytes = BLOB) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if "range" in request.headers:
            first, last = map(int, request.headers["range"].removeprefix("bytes=").split("-"))
            return httpx.Response(206, content=blob[first:last + 1],
                                  headers={"Content-Range": f"bytes {first}-{last}/{len(blob)}"})
        return httpx.Response(200, content=blob)
    return handler


def status(code: int) -> Handler:
    return lambda request: httpx.Response(code)


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


class Fleet:
    """Fake registries by host, each with its own request log."""

    def __init__(self, handlers: dict[str, Handler]) -> None:
        self.handlers = handlers
        self.seen: dict[str, list[str]] = {h: [] for h in handlers}

    def client(self, ep: Endpoint, mirror: bool = False) -> RegistryClient:
        def handler(request: httpx.Request) -> httpx.Response:
            self.seen[ep.registry].append(request.url.path)
            return self.handlers[ep.registry](request)
        return RegistryClient(ep.registry, transport=httpx.MockTransport(handler), retries=1, backoff=0.001,
                              auth_files=[])


def _client(fleet: Fleet, *hosts: str) -> endpoints.MirroredClient:
    eps = [Endpoint(h, "app" if i == len(hosts) - 1 else "cache/app", mirror=i < len(hosts) - 1)
           for i, h in enumerate(hosts)]
    return endpoints.MirroredClient(eps, "app", client_factory=fleet.client)


@pytest.mark.parametrize("mirror", [status(503), status(404), refused, serves(b"x" * 10)])
def test_a_failing_mirror_falls_through_to_the_origin(mirror: Handler) -> None:
    fleet = Fleet({"m.example": mirror, "o.example": serves()})
    with _client(fleet, "m.example", "o.example") as c:
        assert c.get_range("app", DIGEST, 100, 200) == BLOB[100:200]
        assert c.get_blob("app", DIGEST, max_size=1 << 20) == BLOB  # a short/wrong blob fails its digest
    assert fleet.seen["m.example"] and all(p.startswith("/v2/cache/app/") for p in fleet.seen["m.example"])
    assert all(p.startswith("/v2/app/") for p in fleet.seen["o.example"])


def test_a_working_mirror_serves_and_the_origin_sees_nothing() -> None:
    fleet = Fleet({"m.example": serves(), "o.example": serves()})
    with _client(fleet, "m.example", "o.example") as c:
        assert c.get_range("app", DIGEST, 0, 10) == BLOB[:10]
        assert b"".join(c.stream_blob("app", DIGEST)) == BLOB
    assert fleet.seen["o.example"] == []


def test_all_endpoints_failing_is_one_error_naming_each() -> None:
    fleet = Fleet({"m.example": status(404), "o.example": refused})
    with _client(fleet, "m.example", "o.example") as c, pytest.raises(RegistryUnavailable) as exc:
        c.get_range("app", DIGEST, 0, 10)
    text = str(exc.value)
    assert "registry o.example" in text and "registry m.example" in text and "\n" not in text


def test_a_mirror_that_did_not_answer_is_asked_last_for_a_while() -> None:
    fleet = Fleet({"m.example": refused, "o.example": serves()})
    with _client(fleet, "m.example", "o.example") as c:
        c.get_range("app", DIGEST, 0, 10)
        asked = len(fleet.seen["m.example"])
        for _ in range(5):
            assert c.get_range("app", DIGEST, 0, 10) == BLOB[:10]
    assert len(fleet.seen["m.example"]) == asked  # not one failed attempt per request


def test_a_404_puts_a_mirror_aside_for_that_blob_only() -> None:
    fleet = Fleet({"m.example": status(404), "o.example": serves()})
    other = "sha256:" + "e" * 64
    with _client(fleet, "m.example", "o.example") as c:
        c.get_range("app", DIGEST, 0, 10)
        c.get_range("app", DIGEST, 0, 10)
        assert len(fleet.seen["m.example"]) == 1
        c.get_range("app", other, 0, 10)  # another blob: the mirror is asked first again
    assert len(fleet.seen["m.example"]) == 2


def test_tags_resolve_only_on_trusted_endpoints() -> None:
    fleet = Fleet({"m.example": serves(), "o.example": status(404)})
    eps = [Endpoint("m.example", "app", mirror=True, resolve=False), Endpoint("o.example", "app")]
    with endpoints.MirroredClient(eps, "app", client_factory=fleet.client) as c, pytest.raises(RegistryError):
        c.get_manifest("app", "latest")
    assert fleet.seen["m.example"] == []


def test_stream_falls_through_before_the_first_chunk() -> None:
    fleet = Fleet({"m.example": status(500), "o.example": serves()})
    with _client(fleet, "m.example", "o.example") as c:
        assert b"".join(c.stream_blob("app", DIGEST, chunk_size=1000)) == BLOB


def test_a_stream_cut_mid_blob_resumes_from_the_next_endpoint() -> None:
    def cut(request: httpx.Request) -> httpx.Response:
        if "range" in request.headers:
            return httpx.Response(503)

        def body():
            yield BLOB[:5000]
            raise httpx.ReadError("connection reset")
        return httpx.Response(200, content=body())

    asked: list[str] = []

    def origin(request: httpx.Request) -> httpx.Response:
        asked.append(f"{request.method} {request.headers.get('range', '')}".strip())
        return serves()(request)

    fleet = Fleet({"m.example": cut, "o.example": origin})
    with _client(fleet, "m.example", "o.example") as c:
        assert b"".join(c.stream_blob("app", DIGEST, chunk_size=4096)) == BLOB
    assert asked[:3] == ["HEAD", "GET bytes=4096-8191", "GET bytes=8192-12287"]  # the size, then the rest


def test_a_resumed_stream_with_wrong_bytes_fails_its_digest() -> None:
    def cut(request: httpx.Request) -> httpx.Response:
        def body():
            yield BLOB[:5000]
            raise httpx.ReadError("connection reset")
        return httpx.Response(200, content=body()) if "range" not in request.headers else httpx.Response(503)

    liar = bytearray(BLOB)
    liar[9000] ^= 1
    fleet = Fleet({"m.example": cut, "o.example": serves(bytes(liar))})
    with _client(fleet, "m.example", "o.example") as c, pytest.raises(DigestMismatch):
        b"".join(c.stream_blob("app", DIGEST))


def test_blob_source_asks_fallbacks_only_when_the_image_own_endpoints_fail() -> None:
    fleet = Fleet({"a.example": refused, "b.example": serves()})
    calls = []

    def fallback() -> list[Endpoint]:
        calls.append(1)
        return [Endpoint("b.example", "other")]

    src = endpoints.MirroredBlobSource(DIGEST, lambda: [Endpoint("a.example", "app")], fallback, fleet.client, 30)
    assert src.read_range(5, 50) == BLOB[5:50]
    assert calls == [1] and fleet.seen["b.example"] == [f"/v2/other/blobs/{DIGEST}"]
    ok = endpoints.MirroredBlobSource(DIGEST, lambda: [Endpoint("b.example", "app")], fallback, fleet.client, 30)
    assert ok.read_ranges([(0, 4), (8, 12)]) == [BLOB[0:4], BLOB[8:12]]
    assert calls == [1]


# --------------------------------------------------------------------------- which images


def _image(store: Store, name: str, registry: str, repository: str, layers: list[str], n: int) -> None:
    rec = ImageRecord(id="sha256:" + f"{n:x}" * 64, name=name, registry=registry, repository=repository,
                      layers=layers, config={}, config_digest="sha256:" + "0" * 64)
    write_atomic(store.image_file(rec.id), dump_image(rec))
    refs.set_ref(store, name, rec.id)


L1, L2, L3 = ("sha256:" + c * 64 for c in "abc")


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    conf = tmp_path / "registries.conf"
    conf.write_text('[[registry]]\nlocation = "b.example"\n[[registry.mirror]]\nlocation = "mb.example"\n')
    monkeypatch.setenv("LAZYSHIM_REGISTRIES_CONF", str(conf))
    monkeypatch.setenv("LAZYSHIM_HOSTS_DIR", "")
    s = Store(tmp_path / "store")
    s.ensure()
    _image(s, "a.example/py:1", "a.example", "py", [L1, L2], 1)
    _image(s, "b.example/py2:1", "b.example", "py2", [L1, L3], 2)
    _image(s, "c.example/unrelated:1", "c.example", "unrelated", [L3], 3)
    return s


def _groups(src: endpoints.MirroredBlobSource) -> list[list[tuple[str, str]]]:
    return [[(e.registry, e.repository) for e in g()] for g in src._groups]


def test_fills_go_to_the_image_run_with_its_mirrors_then_the_other_holders(store: Store) -> None:
    fs = sources.FillSources(store, ["b.example/py2:1"], [L1, L3])
    primary, fallback = _groups(fs.source(L1, "a.example", "py"))
    assert primary == [("mb.example", "py2"), ("b.example", "py2")]
    assert fallback == [("a.example", "py"), ("mb.example", "py2"), ("b.example", "py2"), ("a.example", "py")]


def test_without_references_the_images_with_exactly_these_layers_stand_in(store: Store) -> None:
    primary, fallback = _groups(sources.FillSources(store, [], [L1, L2]).source(L1, "x.example", "first"))
    assert primary == [("a.example", "py")]
    assert ("x.example", "first") == fallback[-1]


def test_image_references_lists_every_name_of_the_image(store: Store) -> None:
    rec = ImageRecord(id="sha256:" + "1" * 64, name="a.example/py:1", registry="a.example", repository="py",
                      layers=[L1, L2], config={}, config_digest="sha256:" + "0" * 64)
    refs.set_ref(store, "z.example/py:copy", rec.id)
    assert sources.image_references(store, rec) == ["a.example/py:1", "z.example/py:copy"]
    assert sources.image_references(store, rec, "z.example/py:copy") == ["z.example/py:copy", "a.example/py:1"]
    assert sources.image_references(store, rec, "sha256:111111") == ["a.example/py:1", "z.example/py:copy"]


def test_bytes_a_check_refuses_are_read_again_from_the_next_endpoint() -> None:
    from shim.endpoints import BadContent
    from shim.formats.toc import FormatError

    def check(data: bytes) -> int:
        if data != BLOB[10:20]:
            raise FormatError("not a footer")
        return len(data)

    liar = serves(bytes(b ^ 0x5A for b in BLOB))
    fleet = Fleet({"m.example": liar, "o.example": serves()})
    with _client(fleet, "m.example", "o.example") as c:
        assert c.get_checked_range("app", DIGEST, 10, 20, check) == 10
        assert len(fleet.seen["m.example"]) == 1 and len(fleet.seen["o.example"]) == 1
    fleet = Fleet({"m.example": liar, "o.example": liar})
    with _client(fleet, "m.example", "o.example") as c, pytest.raises(BadContent, match="not a footer"):
        c.get_checked_range("app", DIGEST, 10, 20, check)
