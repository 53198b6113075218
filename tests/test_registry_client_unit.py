"""RegistryClient behaviour that a well-behaved local registry never shows, via httpx.MockTransport:
retries/backoff, redirects to blob storage, the bearer-token handshake, lying servers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim.registry import (
    BlobTooLarge,
    DigestMismatch,
    ManifestInvalid,
    RegistryClient,
    RegistryError,
    RegistryUnavailable,
    Unauthorized,
    coalesce_ranges,
)
from shim.registry.auth import Credentials
from shim.registry.manifest import DOCKER_MANIFEST

BLOB = bytes(range(256)) * 40
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
HOST = "reg.example"


def _client(handler: Callable[[httpx.Request], httpx.Response], **kw: object) -> RegistryClient:
    kw.setdefault("retries", 3)
    kw.setdefault("backoff", 0.001)
    kw.setdefault("auth_files", [])
    return RegistryClient(HOST, transport=httpx.MockTransport(handler), **kw)  # type: ignore[arg-type]


def _range(request: httpx.Request) -> httpx.Response:
    first, last = map(int, request.headers["range"].removeprefix("bytes=").split("-"))
    return httpx.Response(
        206, content=BLOB[first : last + 1], headers={"Content-Range": f"bytes {first}-{last}/{len(BLOB)}"}
    )


def test_retries_5xx_and_429_then_succeeds() -> None:
    answers = iter([503, 429, 500])

    def handler(request: httpx.Request) -> httpx.Response:
        status = next(answers, None)
        if status is not None:
            return httpx.Response(status, headers={"Retry-After": "0"})
        return _range(request)

    with _client(handler) as c:
        assert c.scheme == "https"
        assert c.get_range("app", DIGEST, 10, 20) == BLOB[10:20]
        assert c.request_count == 4


def test_retries_are_bounded() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with _client(handler, retries=2) as c:
        with pytest.raises(
            RegistryUnavailable, match=r"^registry reg.example: blob sha256:.* \(3 attempts\)$"
        ):
            c.get_blob("app", DIGEST, max_size=1 << 20)
        assert c.request_count == 3
    with _client(handler, retries=100, backoff=0.05, retry_time=0.2) as c:
        with pytest.raises(RegistryUnavailable):
            c.get_blob("app", DIGEST, max_size=1 << 20)
        assert c.request_count < 10  # the total-time budget stops it


def test_400_is_not_retried_and_is_one_line() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"errors": [{"code": "NAME_INVALID", "message": "bad\nname"}]})

    with _client(handler) as c:
        with pytest.raises(RegistryError) as exc:
            c.get_manifest("app", "v1")
        assert c.request_count == 1
        assert (
            str(exc.value)
            == "registry reg.example: manifest v1 of app: unexpected response (400 NAME_INVALID)"
        )


def test_redirect_to_storage_drops_authorization_keeps_range() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == HOST:
            return httpx.Response(307, headers={"Location": "https://storage.example/blob?sig=1"})
        return _range(request)

    with _client(handler, credentials=Credentials("u", "p")) as c:
        c._auth.challenge('Basic realm="r"', "x", None)  # learnt Basic earlier
        assert c.get_range("app", DIGEST, 0, 100) == BLOB[:100]
    assert "authorization" in seen[0].headers
    assert "authorization" not in seen[1].headers
    assert seen[1].headers["range"] == "bytes=0-99"


def test_redirect_downgrade_to_http_is_refused() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(302, headers={"Location": "http://storage.example/blob"})

    with _client(handler) as c:
        with pytest.raises(RegistryError, match="refusing redirect"):
            c.get_blob("app", DIGEST, max_size=1 << 20)


def test_bearer_token_flow() -> None:
    token_requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            token_requests.append(request)
            return httpx.Response(200, json={"token": "tok", "expires_in": 300})
        if request.headers.get("authorization") != "Bearer tok":
            return httpx.Response(
                401,
                headers={
                    "WWW-Authenticate": 'Bearer realm="https://auth.example/token",service="reg",'
                    'scope="repository:app:pull"'
                },
            )
        return httpx.Response(200, content=BLOB)

    with _client(handler, credentials=Credentials("u", "p")) as c:
        assert c.get_blob("app", DIGEST, max_size=1 << 20) == BLOB
        assert c.get_blob("app", DIGEST, max_size=1 << 20) == BLOB  # cached token, no 401
        assert len(token_requests) == 1
        assert c.request_count == 4  # 401, token, 200, 200
    t = token_requests[0]
    assert t.url.params.get_list("scope") == ["repository:app:pull"]
    assert t.url.params["service"] == "reg"
    assert t.headers["authorization"].startswith("Basic ")


def test_token_server_refusal_is_unauthorized() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth.example":
            return httpx.Response(401)
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="https://auth.example/t"'})

    with _client(handler) as c:
        with pytest.raises(Unauthorized, match="token server refused"):
            c.get_blob("app", DIGEST, max_size=10)


def test_plain_http_token_realm_refused_for_remote_host() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer realm="http://auth.example/t"'})

    with _client(handler, credentials=Credentials("u", "p")) as c:
        with pytest.raises(Unauthorized, match="refusing token realm"):
            c.get_blob("app", DIGEST, max_size=10)


def test_range_must_be_206_with_exact_bytes() -> None:
    def full(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=BLOB)

    def longer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(206, content=BLOB[:50])

    def shorter(request: httpx.Request) -> httpx.Response:
        return httpx.Response(206, content=BLOB[:5], headers={"Content-Range": "bytes 0-4/10240"})

    for handler, pattern in ((full, r"\(200\)"), (longer, "more than 10"), (shorter, "Content-Range")):
        with _client(handler) as c:
            with pytest.raises(RegistryError, match=pattern):
                c.get_range("app", DIGEST, 0, 10)


def test_manifest_header_digest_cross_check_and_bounds() -> None:
    doc = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "digest": DIGEST,
                "size": 1,
            },
            "layers": [],
        }
    ).encode()

    def lying(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=doc, headers={"Docker-Content-Digest": "sha256:" + "0" * 64})

    with _client(lying) as c:
        with pytest.raises(DigestMismatch, match="registry says"):
            c.get_manifest("app", "v1")
        with pytest.raises(DigestMismatch):
            c.get_manifest("app", "sha256:" + "1" * 64)

    def huge(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b" " * (5 << 20))

    with _client(huge) as c:
        with pytest.raises(BlobTooLarge):
            c.get_manifest("app", "v1")

    for bad in (b"not json", b'{"schemaVersion": 1}', b'{"schemaVersion": 2, "manifests": [], "layers": []}'):
        with _client(lambda r, bad=bad: httpx.Response(200, content=bad)) as c:
            with pytest.raises(ManifestInvalid):
                c.get_manifest("app", "v1")


def test_stream_blob_resumes_after_connection_loss() -> None:
    class Flaky(httpx.SyncByteStream):
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield BLOB[:1000]
            raise httpx.ReadError("connection reset")

    def handler(request: httpx.Request) -> httpx.Response:
        if "range" in request.headers:
            return (
                _range(request)
                if request.headers["range"] != "bytes=1000-"
                else httpx.Response(
                    206,
                    content=BLOB[1000:],
                    headers={"Content-Range": f"bytes 1000-{len(BLOB) - 1}/{len(BLOB)}"},
                )
            )
        return httpx.Response(200, stream=Flaky())

    with _client(handler) as c:
        assert b"".join(c.stream_blob("app", DIGEST, chunk_size=500)) == BLOB
        assert c.request_count == 2


@given(
    st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 200)), max_size=30),
    st.integers(0, 100),
    st.none() | st.integers(1, 500),
)
def test_coalesce_ranges_covers_everything(
    raw: list[tuple[int, int]], gap: int, max_span: int | None
) -> None:
    ranges = [(s, s + n) for s, n in raw]
    spans = coalesce_ranges(ranges, gap, max_span)
    assert spans == sorted(spans)
    for a, b in zip(spans, spans[1:], strict=False):
        assert a[1] < b[0] or (max_span is not None and a[1] <= b[0])  # disjoint
    for s, e in ranges:
        if e > s:
            assert any(a <= s and e <= b for a, b in spans)
    assert len(spans) <= len([r for r in ranges if r[1] > r[0]])


def test_plain_http_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    from shim.registry.client import is_loopback

    assert is_loopback("localhost:5000") and is_loopback("127.3.2.1") and is_loopback("[::1]:5000")
    assert not is_loopback("10.0.0.1:5000") and not is_loopback("localhost.example.com")
    monkeypatch.setenv("LAZYSHIM_INSECURE_REGISTRIES", "mirror.internal:5000, other")
    for host, scheme in (("mirror.internal:5000", "http"), ("other:443", "http"), ("third", "https")):
        with RegistryClient(host, auth_files=[]) as c:
            assert c.scheme == scheme
    with RegistryClient("127.0.0.1:5000", insecure=False, auth_files=[]) as c:
        assert c.scheme == "https"


def test_invalid_arguments_raise_value_errors_eagerly() -> None:
    with _client(lambda r: httpx.Response(500)) as c:
        with pytest.raises(ValueError):
            c.stream_blob("app", "sha256:short")
        with pytest.raises(ValueError):
            c.get_blob("Bad Repo", DIGEST, max_size=1)
        with pytest.raises(ValueError):
            c.get_ranges("app", DIGEST, [(5, 1)])
        assert c.request_count == 0


def test_retry_after_takes_seconds_and_http_dates() -> None:
    from shim.registry.client import _retry_after

    now = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
    assert _retry_after("3", now) == 3.0
    assert _retry_after(" 0 ", now) == 0.0
    assert _retry_after("-5", now) == 0.0
    assert _retry_after("Tue, 14 Nov 2023 22:13:25 GMT", now) == 5.0
    assert _retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now) == 0.0  # already past
    assert _retry_after("soon", now) is None
    assert _retry_after("Tue, 14 Nov 2023 22:13:25", now) is None  # no zone: not an HTTP-date
    assert _retry_after(None, now) is None and _retry_after("", now) is None
