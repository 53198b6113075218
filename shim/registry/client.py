"""HTTP client for an OCI distribution registry: manifests, verified blobs, byte ranges, push.

Lazy pulling fetches individual file ranges on demand from the seccomp supervisor, from many
threads at once, while a container waits on the syscall.  Hence:

* one `httpx.Client` per registry, shared by all threads (keep-alive connection pool); the
  only other shared state is the token cache (locked) and a request counter (locked);
* every byte is checked: whole blobs and manifests against their digest, ranges against
  the exact length and Content-Range asked for (ranges are verified by the caller against
  the TOC's chunk digests);
* failures are bounded (retry count *and* total retry time) and always end in a
  `RegistryError` subclass with a one-line message - never an httpx traceback;
* redirects are followed by hand so Authorization never leaks to another host (blob
  storage) and https is never downgraded to http.
"""

from __future__ import annotations

import email.utils
import ipaddress
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import httpx

from ..ranges import merge
from .auth import Authenticator, AuthError, Credentials, find_credentials
from .errors import (
    BlobTooLarge,
    DigestMismatch,
    ManifestInvalid,
    NotFound,
    PlatformNotFound,
    RegistryError,
    RegistryUnavailable,
    Unauthorized,
    one_line,
    short_digest,
)
from .manifest import (
    ACCEPT_MANIFESTS,
    MAX_MANIFEST_SIZE,
    Descriptor,
    Index,
    Manifest,
    Platform,
    check_hash,
    compute_digest,
    hasher,
    parse_manifest_document,
    select_platform,
    verify_digest,
)
from .reference import DIGEST_RE, validate_digest, validate_registry, validate_repository, validate_tag

__all__ = [
    "BlobTooLarge",
    "Descriptor",
    "DigestMismatch",
    "Index",
    "Manifest",
    "ManifestInvalid",
    "NotFound",
    "PlatformNotFound",
    "RegistryClient",
    "RegistryError",
    "RegistryUnavailable",
    "Unauthorized",
    "coalesce_ranges",
]

T = TypeVar("T")

INSECURE_ENV = "LAZYSHIM_INSECURE_REGISTRIES"
MAX_REDIRECTS = 5
MAX_ERROR_BODY = 64 * 1024
MAX_TOKEN_BODY = 1 << 20
MAX_RETRY_AFTER = 10.0
MAX_BACKOFF = 5.0
DEFAULT_UPLOAD_CHUNK = 8 << 20
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_IDENTITY = {"Accept-Encoding": "identity"}


def _split_host(registry: str) -> str:
    """The host part of `host[:port]` / `[v6]:port`, without brackets."""
    if registry.startswith("["):
        return registry[1 : registry.index("]")]
    return registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry


def is_loopback(registry: str) -> bool:
    """localhost, 127.0.0.0/8 and ::1 are the only hosts plain HTTP is allowed to by default."""
    host = _split_host(registry)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _env_insecure(registry: str) -> bool:
    from .. import config

    names = [n.strip() for n in (config.get("insecure_registries") or "").split(",") if n.strip()]
    return registry in names or _split_host(registry) in names


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    default = {"http": 80, "https": 443}.get(url.scheme)
    return (url.scheme, url.host, url.port or default)


def _describe(exc: httpx.HTTPError) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


def coalesce_ranges(
    ranges: list[tuple[int, int]], gap: int, max_span: int | None = None
) -> list[tuple[int, int]]:
    """Merge sorted/unsorted half-open ranges whose distance is <= `gap` into spans
    (`shim.ranges.merge`, the one merger fills and prefetch use too)."""
    return [(s.start, s.end) for s in merge(((a, b, None) for a, b in ranges), gap, max_span)]


class _Retry:
    """Retry budget of one logical operation: bounded attempts and bounded total time."""

    def __init__(self, client: RegistryClient, what: str, idempotent: bool) -> None:
        self.client, self.what, self.idempotent = client, what, idempotent
        self.attempt = 0
        self.deadline = time.monotonic() + client.retry_time

    def wait_or_raise(self, reason: str, *, safe: bool = False, retry_after: float | None = None) -> None:
        """Sleep before the next attempt, or raise RegistryUnavailable if the budget is spent.

        `safe` marks failures where the request certainly never reached the server (connect
        errors), which may be retried even for non-idempotent requests.
        """
        c = self.client
        delay = min(MAX_BACKOFF, c.backoff * (2**self.attempt)) * (0.5 + random.random() / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
        if (
            not (self.idempotent or safe)
            or self.attempt >= c.retries
            or time.monotonic() + delay > self.deadline
        ):
            tries = self.attempt + 1
            raise RegistryUnavailable(
                f"registry {c.registry}: {self.what}: {reason} ({tries} attempt{'s' if tries > 1 else ''})"
            )
        time.sleep(delay)
        self.attempt += 1


class RegistryClient:
    """A thread-safe client for one registry (`host[:port]`).

    Plain HTTP is used only for loopback hosts, when `insecure=True`, or when the registry is
    listed in $LAZYSHIM_INSECURE_REGISTRIES (comma-separated); `insecure=False` forces https.
    Credentials come from the usual auth files (`auth_files` overrides the list).
    `request_count` counts HTTP requests sent (every redirect hop and retry), for tests and
    statistics.
    """

    def __init__(
        self,
        registry: str,
        *,
        insecure: bool | None = None,
        timeout: float = 30.0,
        retries: int = 3,
        backoff: float = 0.2,
        retry_time: float = 60.0,
        auth_files: list[Path] | None = None,
        credentials: Credentials | None = None,
        max_connections: int = 64,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        validate_registry(registry)
        self.registry = registry
        if insecure is None:
            insecure = is_loopback(registry) or _env_insecure(registry)
        self.scheme = "http" if insecure else "https"
        host = "registry-1.docker.io" if registry == "docker.io" else registry
        self.base = httpx.URL(f"{self.scheme}://{host}")
        self._insecure = insecure
        self.retries = max(0, retries)
        self.backoff = max(0.0, backoff)
        self.retry_time = retry_time
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            follow_redirects=False,
            # Proxies/CA bundles from the environment, but never for loopback test registries.
            trust_env=not is_loopback(registry),
            transport=transport,
        )
        if credentials is None:
            credentials = find_credentials(registry, None, auth_files)
        self._auth = Authenticator(credentials, self._fetch_token)
        self._count_lock = threading.Lock()
        self.request_count = 0
        self._closed = False

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Close pooled connections; idempotent."""
        if not self._closed:
            self._closed = True
            self._http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ HTTP core

    def _url(self, path: str) -> httpx.URL:
        return self.base.join(path)

    def _may_use_http(self, url: httpx.URL) -> bool:
        return url.scheme == "https" or (url.host is not None and is_loopback(url.host)) or self._insecure

    def _send(
        self, method: str, url: httpx.URL, scope: str, headers: dict[str, str], content: bytes | None
    ) -> httpx.Response:
        """Send one request, following redirects by hand; return the streaming response.

        Authorization is attached only for the registry's own origin, so presigned storage
        URLs never see our token; 303 (and 301/302 for non-GET) switch to GET without body.
        """
        base_origin = _origin(self.base)
        try:
            auth = self._auth.header(scope)
        except AuthError as e:
            raise Unauthorized(f"registry {self.registry}: {e}") from None
        for _hop in range(MAX_REDIRECTS + 1):
            hdrs = dict(headers)
            if auth and _origin(url) == base_origin:
                hdrs["Authorization"] = auth
            req = self._http.build_request(method, url, headers=hdrs, content=content)
            with self._count_lock:
                self.request_count += 1
            resp = self._http.send(req, stream=True)
            if resp.status_code not in _REDIRECTS or "location" not in resp.headers:
                return resp
            resp.close()
            try:
                nxt = resp.url.join(resp.headers["location"])
            except httpx.InvalidURL:
                raise RegistryError(f"registry {self.registry}: invalid redirect location") from None
            if nxt.scheme not in ("http", "https") or (nxt.scheme == "http" and not self._may_use_http(nxt)):
                raise RegistryError(
                    f"registry {self.registry}: refusing redirect to {nxt.scheme}://{nxt.host}"
                )
            if resp.status_code == 303 or (resp.status_code in (301, 302) and method not in ("GET", "HEAD")):
                method, content = "GET", None
            url = nxt
        raise RegistryError(f"registry {self.registry}: more than {MAX_REDIRECTS} redirects")

    def _open(
        self,
        method: str,
        url: httpx.URL,
        *,
        scope: str,
        what: str,
        expect: tuple[int, ...],
        retry: _Retry,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        """Retry until a response with a status in `expect` arrives; return it still streaming.

        401 answers are handled by the Authenticator (at most twice per call, not counted
        as retries); 429/5xx/transport errors use the retry budget; other statuses raise.
        """
        auth_rounds = 0
        while True:
            try:
                resp = self._send(method, url, scope, headers or {}, content)
            except httpx.TransportError as e:
                safe = isinstance(e, httpx.ConnectError | httpx.ConnectTimeout)
                retry.wait_or_raise(_describe(e), safe=safe)
                continue
            except httpx.HTTPError as e:  # InvalidURL, TooManyRedirects...: not retryable
                raise RegistryError(f"registry {self.registry}: {what}: {_describe(e)}") from None
            status = resp.status_code
            if status in expect:
                return resp
            try:
                if status == 401 and auth_rounds < 2 and _origin(resp.url) == _origin(self.base):
                    auth_rounds += 1
                    try:
                        sent = resp.request.headers.get("authorization")
                        hdr = self._auth.challenge(resp.headers.get("www-authenticate", ""), scope, sent)
                    except AuthError as e:
                        raise Unauthorized(f"registry {self.registry}: {what}: {e}") from None
                    if hdr is not None:
                        continue
                if status == 429 or status >= 500:
                    retry_after = _retry_after(resp.headers.get("retry-after"))
                    reason = f"HTTP {status}{_error_code(resp)}"
                else:
                    raise self._status_error(resp, what)
            finally:
                resp.close()
            retry.wait_or_raise(reason, retry_after=retry_after)

    def _call(
        self,
        method: str,
        url: httpx.URL,
        consume: Callable[[httpx.Response], T],
        *,
        scope: str,
        what: str,
        expect: tuple[int, ...] = (200,),
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        idempotent: bool = True,
    ) -> T:
        """`_open` plus reading the body with `consume`; body read errors are retried too."""
        self._check_open()
        retry = _Retry(self, what, idempotent)
        while True:
            resp = self._open(
                method,
                url,
                scope=scope,
                what=what,
                expect=expect,
                retry=retry,
                headers=headers,
                content=content,
            )
            try:
                return consume(resp)
            except httpx.TransportError as e:
                reason = _describe(e)
            except httpx.HTTPError as e:
                raise RegistryError(f"registry {self.registry}: {what}: {_describe(e)}") from None
            finally:
                resp.close()
            retry.wait_or_raise(reason)

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryError(f"registry {self.registry}: client is closed")

    def _status_error(self, resp: httpx.Response, what: str) -> RegistryError:
        status = resp.status_code
        detail = f"{status}{_error_code(resp)}"
        prefix = f"registry {self.registry}: {what}"
        if status == 404:
            return NotFound(f"{prefix}: not found ({detail})")
        if status in (401, 403):
            return Unauthorized(f"{prefix}: access denied ({detail})")
        if status == 416:
            return RegistryError(f"{prefix}: range not satisfiable ({detail})")
        return RegistryError(f"{prefix}: unexpected response ({detail})")

    def _fetch_token(self, realm: str, params: list[tuple[str, str]], creds: Credentials | None) -> bytes:
        """GET a bearer token from the challenge's realm (called by the Authenticator)."""
        try:
            url = httpx.URL(realm).copy_merge_params(params)
        except (httpx.InvalidURL, TypeError):
            raise Unauthorized(f"registry {self.registry}: invalid token realm") from None
        if url.scheme not in ("http", "https") or (url.scheme == "http" and not self._may_use_http(url)):
            raise Unauthorized(f"registry {self.registry}: refusing token realm {url.scheme}://{url.host}")
        headers = dict(_IDENTITY)
        if creds is not None and (creds.username or creds.password):
            headers["Authorization"] = creds.basic_header()
        what = f"token from {url.host}"
        retry = _Retry(self, what, idempotent=True)
        while True:
            try:
                with self._count_lock:
                    self.request_count += 1
                with self._http.stream("GET", url, headers=headers) as resp:
                    if resp.status_code == 200:
                        return _read_bounded(resp, MAX_TOKEN_BODY, f"registry {self.registry}: {what}")
                    if resp.status_code < 500 and resp.status_code != 429:
                        raise Unauthorized(
                            f"registry {self.registry}: token server refused ({resp.status_code})"
                        )
                    reason = f"HTTP {resp.status_code}"
            except httpx.TransportError as e:
                reason = _describe(e)
            except httpx.HTTPError as e:
                raise Unauthorized(f"registry {self.registry}: {what}: {_describe(e)}") from None
            retry.wait_or_raise(reason)

    # ------------------------------------------------------------------ helpers

    def _what_blob(self, repository: str, digest: str) -> str:
        return f"blob {short_digest(digest)} in {repository}"

    @staticmethod
    def _pull(repository: str) -> str:
        return f"repository:{repository}:pull"

    @staticmethod
    def _push(repository: str) -> str:
        return f"repository:{repository}:pull,push"

    def _blob_url(self, repository: str, digest: str) -> httpx.URL:
        validate_repository(repository)
        validate_digest(digest)
        return self._url(f"/v2/{repository}/blobs/{digest}")

    # ------------------------------------------------------------------ manifests

    def fetch_manifest(self, repository: str, reference: str) -> Manifest | Index:
        """GET one manifest document (no index resolution), digest-verified and parsed.

        Fetched by digest, the content must hash to it; fetched by tag, the digest is
        computed (sha256) and the Docker-Content-Digest header is only a cross-check.
        """
        validate_repository(repository)
        by_digest = reference.startswith(("sha256:", "sha512:"))
        if by_digest:
            validate_digest(reference)
        else:
            validate_tag(reference)
        what = f"manifest {short_digest(reference) if by_digest else reference} of {repository}"

        def consume(resp: httpx.Response) -> tuple[bytes, str | None, str | None]:
            raw = _read_bounded(resp, MAX_MANIFEST_SIZE, f"registry {self.registry}: {what}")
            return raw, resp.headers.get("content-type"), resp.headers.get("docker-content-digest")

        raw, ctype, header_digest = self._call(
            "GET",
            self._url(f"/v2/{repository}/manifests/{reference}"),
            consume,
            scope=self._pull(repository),
            what=what,
            headers={"Accept": ACCEPT_MANIFESTS, **_IDENTITY},
        )
        prefix = f"registry {self.registry}: {what}"
        if by_digest:
            verify_digest(raw, reference, prefix)
            digest = reference
        else:
            digest = compute_digest(raw)
        if header_digest and DIGEST_RE.match(header_digest):
            algo = header_digest.split(":", 1)[0]
            computed = digest if digest.startswith(algo + ":") else compute_digest(raw, algo)
            if computed != header_digest:
                raise DigestMismatch(
                    f"{prefix}: content has digest {short_digest(computed)}, "
                    f"registry says {short_digest(header_digest)}"
                )
        return parse_manifest_document(raw, digest, ctype, prefix)

    def get_manifest(
        self,
        repository: str,
        reference: str,
        *,
        platform: Platform | None = ("linux", "amd64", None),
    ) -> Manifest:
        """The image manifest for `reference` (tag or digest), resolving an index by platform.

        `platform` is (os, architecture, variant); variant None prefers the architecture's
        default.  With platform=None an index is an error (use `get_index`).
        """
        doc = self.fetch_manifest(repository, reference)
        if isinstance(doc, Manifest):
            return doc
        what = f"registry {self.registry}: index {short_digest(doc.digest)} of {repository}"
        if platform is None:
            raise ManifestInvalid(f"{what}: is an image index and no platform was given")
        child = select_platform(doc, platform, what)
        sub = self.fetch_manifest(repository, child.digest)
        if not isinstance(sub, Manifest):
            raise ManifestInvalid(f"{what}: entry {short_digest(child.digest)} is not an image manifest")
        return Manifest(sub.digest, sub.media_type, sub.raw, sub.json, sub.config, sub.layers, doc.digest)

    def get_index(self, repository: str, reference: str) -> Index:
        """The image index / manifest list at `reference`; ManifestInvalid if it is not one."""
        doc = self.fetch_manifest(repository, reference)
        if not isinstance(doc, Index):
            raise ManifestInvalid(
                f"registry {self.registry}: {reference} of {repository} is not an image index"
            )
        return doc

    # ------------------------------------------------------------------ blobs

    def blob_size(self, repository: str, digest: str) -> int:
        """Size of a blob from HEAD's Content-Length (NotFound if absent)."""
        what = self._what_blob(repository, digest)

        def consume(resp: httpx.Response) -> int:
            length = resp.headers.get("content-length", "")
            if not length.isdigit():
                raise RegistryError(f"registry {self.registry}: {what}: HEAD without Content-Length")
            return int(length)

        return self._call(
            "HEAD",
            self._blob_url(repository, digest),
            consume,
            scope=self._pull(repository),
            what=what,
            headers=dict(_IDENTITY),
        )

    def has_blob(self, repository: str, digest: str) -> bool:
        """Whether the registry has the blob in `repository` (HEAD: 200 yes, 404 no)."""
        return self._call(
            "HEAD",
            self._blob_url(repository, digest),
            lambda r: r.status_code == 200,
            scope=self._pull(repository),
            what=self._what_blob(repository, digest),
            expect=(200, 404),
            headers=dict(_IDENTITY),
        )

    def get_blob(self, repository: str, digest: str, *, max_size: int) -> bytes:
        """The whole blob, verified against `digest`; BlobTooLarge beyond `max_size` bytes."""
        what = self._what_blob(repository, digest)
        prefix = f"registry {self.registry}: {what}"

        def consume(resp: httpx.Response) -> bytes:
            data = _read_bounded(resp, max_size, prefix)
            verify_digest(data, digest, prefix)
            return data

        return self._call(
            "GET",
            self._blob_url(repository, digest),
            consume,
            scope=self._pull(repository),
            what=what,
            headers=dict(_IDENTITY),
        )

    def stream_blob(
        self, repository: str, digest: str, *, chunk_size: int = 1 << 20, max_size: int | None = None
    ) -> Iterator[bytes]:
        """Yield the blob in chunks; raise DigestMismatch after the last chunk if it is wrong.

        Callers must not commit anything until the iterator is exhausted.  A connection lost
        mid-body is resumed with a Range request from the bytes already received (same retry
        budget), so a long download survives a flaky link.  Arguments are validated now;
        the first request is sent on the first `next()`.
        """
        url = self._blob_url(repository, digest)
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        return self._stream_blob(url, repository, digest, chunk_size, max_size)

    def _stream_blob(
        self, url: httpx.URL, repository: str, digest: str, chunk_size: int, max_size: int | None
    ) -> Iterator[bytes]:
        what = self._what_blob(repository, digest)
        prefix = f"registry {self.registry}: {what}"
        self._check_open()
        h = hasher(digest)
        received = 0
        retry = _Retry(self, what, idempotent=True)
        while True:
            headers = dict(_IDENTITY)
            if received:
                headers["Range"] = f"bytes={received}-"
            resp = self._open(
                "GET",
                url,
                scope=self._pull(repository),
                what=what,
                expect=(206,) if received else (200,),
                retry=retry,
                headers=headers,
            )
            reason = ""
            try:
                if received:
                    cr = _parse_content_range(resp.headers.get("content-range"))
                    if cr is None or cr[0] != received:
                        raise RegistryError(f"{prefix}: resumed download returned the wrong range")
                length = resp.headers.get("content-length", "")
                if max_size is not None and length.isdigit() and received + int(length) > max_size:
                    raise BlobTooLarge(f"{prefix}: larger than {max_size} bytes")
                for chunk in _iter_raw(resp, chunk_size):
                    received += len(chunk)
                    if max_size is not None and received > max_size:
                        raise BlobTooLarge(f"{prefix}: larger than {max_size} bytes")
                    h.update(chunk)
                    yield chunk
                break
            except httpx.TransportError as e:
                reason = _describe(e)
            except httpx.HTTPError as e:
                raise RegistryError(f"{prefix}: {_describe(e)}") from None
            finally:
                resp.close()
            retry.wait_or_raise(reason)
        check_hash(h, digest, prefix)

    def get_range(self, repository: str, digest: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a blob with one single-range request.

        The answer must be 206 with exactly end-start bytes (and a matching Content-Range if
        sent); anything else is an error, because a registry that ignores Range would
        otherwise make us download whole layers per file.  No digest check is possible
        here: callers verify chunk digests from the TOC.
        """
        if isinstance(start, bool) or isinstance(end, bool) or start < 0 or end < start:
            raise ValueError(f"invalid byte range [{start}, {end})")
        url = self._blob_url(repository, digest)
        if start == end:
            return b""
        what = f"{self._what_blob(repository, digest)} range [{start}, {end})"
        prefix = f"registry {self.registry}: {what}"
        n = end - start

        def consume(resp: httpx.Response) -> bytes:
            cr = resp.headers.get("content-range")
            if cr is not None:
                parsed = _parse_content_range(cr)
                if parsed is None or parsed[:2] != (start, end - 1):
                    raise RegistryError(f"{prefix}: server answered Content-Range {one_line(cr)[:60]!r}")
            data = _read_bounded(resp, n, prefix)
            if len(data) != n:
                raise RegistryError(f"{prefix}: short read ({len(data)} of {n} bytes)")
            return data

        try:
            return self._call(
                "GET",
                url,
                consume,
                scope=self._pull(repository),
                what=what,
                expect=(206,),
                headers={"Range": f"bytes={start}-{end - 1}", **_IDENTITY},
            )
        except BlobTooLarge:
            raise RegistryError(f"{prefix}: server sent more than {n} bytes") from None

    def get_ranges(
        self,
        repository: str,
        digest: str,
        ranges: list[tuple[int, int]],
        *,
        gap: int = 0,
        max_span: int | None = None,
    ) -> list[bytes]:
        """Bytes of each half-open range, in input order, with as few requests as possible.

        Ranges closer than `gap` bytes (and overlapping ones) are fetched as one single-range
        request and split back; `max_span` caps a merged request.  Each request is one
        `get_range`, so this is as thread-safe and strict as that.
        """
        for s, e in ranges:
            if isinstance(s, bool) or isinstance(e, bool) or s < 0 or e < s:
                raise ValueError(f"invalid byte range [{s}, {e})")
        spans = coalesce_ranges(ranges, max(0, gap), max_span)
        fetched = [(s, self.get_range(repository, digest, s, e)) for s, e in spans]
        out: list[bytes] = []
        for s, e in ranges:
            if s == e:
                out.append(b"")
                continue
            for span_start, data in fetched:
                if span_start <= s and e <= span_start + len(data):
                    out.append(data[s - span_start : e - span_start])
                    break
            else:  # pragma: no cover - coalesce_ranges covers every non-empty range
                raise AssertionError("range not covered")
        return out

    # ------------------------------------------------------------------ push

    def push_blob(
        self,
        repository: str,
        digest: str,
        data: bytes | Path,
        *,
        mount_from: str | None = None,
        chunk_size: int = DEFAULT_UPLOAD_CHUNK,
    ) -> bool:
        """Upload a blob unless present; return True if bytes were uploaded.

        Bytes and small files go in one monolithic POST+PUT; a Path larger than `chunk_size`
        is sent as PATCH chunks (never fully in memory) and hashed on the way, so a wrong
        digest is caught before the upload is committed.  `mount_from` asks the registry to
        link the blob from another repository first (no bytes move if it can).
        """
        validate_repository(repository)
        validate_digest(digest)
        what = self._what_blob(repository, digest)
        prefix = f"registry {self.registry}: {what}"
        if self.has_blob(repository, digest):
            return False
        size = len(data) if isinstance(data, bytes) else _file_size(data, prefix)
        small = isinstance(data, bytes) or size <= chunk_size
        payload: bytes | None = None
        if small:
            payload = data if isinstance(data, bytes) else _read_file(data, prefix)
            verify_digest(payload, digest, prefix)
        scope = self._push(repository)
        start_url = self._url(f"/v2/{repository}/blobs/uploads/")
        if mount_from is not None:
            validate_repository(mount_from)
            scope += " " + self._pull(mount_from)
            start_url = start_url.copy_merge_params({"mount": digest, "from": mount_from})
        status, location = self._call(
            "POST",
            start_url,
            lambda r: (r.status_code, _location(r)),
            scope=scope,
            what=what,
            expect=(201, 202),
            content=b"",
        )
        if status == 201:
            return False  # mounted
        if location is None:
            raise RegistryError(f"{prefix}: upload started without a Location")
        if payload is not None:
            self._finish_upload(location, digest, payload, scope, what)
            return True
        assert isinstance(data, Path)
        h = hasher(digest)
        offset = 0
        try:
            with open(data, "rb") as f:
                while chunk := f.read(chunk_size):
                    h.update(chunk)
                    headers = {
                        "Content-Type": "application/octet-stream",
                        "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
                    }
                    new_loc = self._call(
                        "PATCH",
                        location,
                        _location,
                        scope=scope,
                        what=what,
                        expect=(202,),
                        headers=headers,
                        content=chunk,
                        idempotent=False,
                    )
                    location = new_loc or location
                    offset += len(chunk)
        except OSError as e:
            raise RegistryError(f"{prefix}: cannot read {data}: {e.strerror}") from None
        try:
            check_hash(h, digest, prefix)
        except DigestMismatch:
            self._cancel_upload(location, scope, what)
            raise
        self._finish_upload(location, digest, b"", scope, what)
        return True

    def _finish_upload(self, location: httpx.URL, digest: str, payload: bytes, scope: str, what: str) -> None:
        self._call(
            "PUT",
            location.copy_merge_params({"digest": digest}),
            lambda r: None,
            scope=scope,
            what=what,
            expect=(201, 204),
            headers={"Content-Type": "application/octet-stream"},
            content=payload,
        )

    def _cancel_upload(self, location: httpx.URL, scope: str, what: str) -> None:
        try:
            self._call("DELETE", location, lambda r: None, scope=scope, what=what, expect=(204, 404))
        except RegistryError:
            pass  # best effort: the registry purges abandoned uploads itself

    def push_manifest(self, repository: str, tag: str | None, raw: bytes, media_type: str) -> str:
        """PUT a manifest or index under `tag` (or by digest if tag is None); return its digest."""
        validate_repository(repository)
        digest = compute_digest(raw)
        reference = validate_tag(tag) if tag is not None else digest
        what = f"manifest {reference if tag else short_digest(digest)} of {repository}"
        prefix = f"registry {self.registry}: {what}"
        if len(raw) > MAX_MANIFEST_SIZE:
            raise BlobTooLarge(f"{prefix}: larger than {MAX_MANIFEST_SIZE} bytes")
        header_digest = self._call(
            "PUT",
            self._url(f"/v2/{repository}/manifests/{reference}"),
            lambda r: r.headers.get("docker-content-digest"),
            scope=self._push(repository),
            what=what,
            expect=(201, 204),
            headers={"Content-Type": media_type},
            content=raw,
        )
        if header_digest and header_digest.startswith("sha256:") and header_digest != digest:
            raise DigestMismatch(
                f"{prefix}: registry stored {short_digest(header_digest)}, expected {short_digest(digest)}"
            )
        return digest


# ---------------------------------------------------------------------- module helpers


def _read_bounded(resp: httpx.Response, limit: int, prefix: str) -> bytes:
    """Read the raw body, refusing (BlobTooLarge) more than `limit` bytes, before or while reading."""
    length = resp.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise BlobTooLarge(f"{prefix}: {int(length)} bytes exceeds the limit of {limit}")
    buf = bytearray()
    for chunk in _iter_raw(resp):
        buf += chunk
        if len(buf) > limit:
            raise BlobTooLarge(f"{prefix}: more than {limit} bytes")
    return bytes(buf)


def _iter_raw(resp: httpx.Response, chunk_size: int | None = None) -> Iterator[bytes]:
    """The undecoded body (what digests cover), also for responses a transport pre-read."""
    try:
        content = resp.content
    except httpx.ResponseNotRead:
        yield from resp.iter_raw(chunk_size)
        return
    step = chunk_size or len(content) or 1
    for i in range(0, len(content), step):
        yield content[i : i + step]


def _error_code(resp: httpx.Response) -> str:
    """` BLOB_UNKNOWN` from a distribution error body, or "" (reads at most 64 KiB)."""
    try:
        if "json" not in resp.headers.get("content-type", ""):
            return ""
        body = _read_bounded(resp, MAX_ERROR_BODY, "")
        errors = json.loads(body).get("errors")
        code = errors[0].get("code") if isinstance(errors, list) and errors else None
    except (httpx.HTTPError, RegistryError, ValueError, AttributeError, TypeError):
        return ""
    return " " + one_line(code)[:40] if isinstance(code, str) and code else ""


def _retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP-date (RFC 9110);
    None for junk (our own backoff then applies).  The caller caps it."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # an HTTP-date is always GMT: a date without a zone is not one
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _parse_content_range(value: str | None) -> tuple[int, int, int | None] | None:
    """`bytes 10-19/100` -> (10, 19, 100); `*` total -> None total; junk -> None."""
    if not value:
        return None
    unit, _, rest = value.strip().partition(" ")
    rng, _, total = rest.partition("/")
    first, _, last = rng.partition("-")
    if unit != "bytes" or not first.isdigit() or not last.isdigit():
        return None
    return int(first), int(last), int(total) if total.isdigit() else None


def _location(resp: httpx.Response) -> httpx.URL | None:
    loc = resp.headers.get("location")
    if not loc:
        return None
    try:
        return resp.url.join(loc)
    except httpx.InvalidURL:
        return None


def _file_size(path: Path, prefix: str) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise RegistryError(f"{prefix}: cannot read {path}: {e.strerror}") from None


def _read_file(path: Path, prefix: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise RegistryError(f"{prefix}: cannot read {path}: {e.strerror}") from None
