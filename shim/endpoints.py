"""Reading from an ordered list of registry endpoints (mirrors, then the origin), with
fall-through: the layer above `RegistryClient` that pulls and fills use.

Any registry error of an endpoint (connection refused, 5xx, 404, a wrong digest or range)
moves on to the next one.  For MIRROR_COOLDOWN seconds an endpoint that did not answer at
all is tried last, and one that failed a blob is tried last for that blob, so a stopped
mirror (or a pull-through cache that does not hold a blob yet) costs one failed attempt,
not one per file.  Nothing here trusts an endpoint: each client verifies what it returns
(manifest and blob digests, exact ranges) and callers check TOC and chunk digests as they
do for the origin.  Clients are made by the caller (shim.sources), so this module reads
no environment.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from .errors import LazyshimError
from .registry.client import RegistryClient
from .registry.errors import DigestMismatch, RegistryError, RegistryUnavailable
from .registry.mirrors import Endpoint

T = TypeVar("T")

MIRROR_COOLDOWN = 30.0


class BadContent(DigestMismatch):
    """An endpoint served bytes the caller's own check refused (wrong footer, wrong TOC)."""


class _Health:
    """Endpoints that did not answer at all, and endpoints that failed one blob (a cache that
    does not hold it yet, a 404, a wrong range), remembered for a while by the whole process."""

    def __init__(self) -> None:
        self._down: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def order(self, endpoints: Sequence[Endpoint], blob: str | None = None) -> list[Endpoint]:
        """The endpoints in their order, those that failed recently (for `blob`) moved to the end."""
        if not self._down:
            return list(endpoints)
        now = time.monotonic()
        with self._lock:
            down = {k for k, until in self._down.items() if until > now}
        aside = [e for e in endpoints if e.key in down or (e.key, blob) in down]
        return [e for e in endpoints if e not in aside] + aside

    def failed(self, ep: Endpoint, err: RegistryError, blob: str | None = None) -> None:
        key = ep.key if isinstance(err, RegistryUnavailable) else (ep.key, blob) if blob else None
        if key is not None:
            with self._lock:
                self._down[key] = time.monotonic() + MIRROR_COOLDOWN

    def distrust(self, ep: Endpoint, blob: str) -> None:
        """`ep` served bytes of `blob` that failed verification: try it last for that blob."""
        with self._lock:
            self._down[(ep.key, blob)] = time.monotonic() + MIRROR_COOLDOWN

    def answered(self, ep: Endpoint, blob: str | None = None) -> None:
        if self._down:
            with self._lock:
                self._down.pop(ep.key, None)
                self._down.pop((ep.key, blob), None)


_health = _Health()


def _all_failed(errors: list[Exception], what: str) -> Exception:
    """One error for a request every endpoint refused: the last one's type, all their reasons."""
    if not errors:
        return LazyshimError(f"{what}: no registry endpoint to read from")
    last = errors[-1]
    if len(errors) == 1:
        return last
    others = "; ".join(str(e) for e in errors[:-1])
    cls = type(last) if isinstance(last, RegistryError | LazyshimError) else RegistryError
    return cls(f"{last} (tried before: {others})")


def _first_answer(endpoints: Sequence[Endpoint], call: Callable[[Endpoint], T], errors: list[Exception],
                  deadline: float | None = None, blob: str | None = None) -> tuple[bool, T | None]:
    """(True, result) of the first endpoint that answers `call` (about `blob`), or (False, None)
    with the reasons appended to `errors`.  After `deadline` (monotonic) no further endpoint
    is asked."""
    for ep in _health.order(endpoints, blob):
        if deadline is not None and errors and time.monotonic() > deadline:
            break
        try:
            result = call(ep)
        except RegistryError as e:
            _health.failed(ep, e, blob)
            errors.append(e)
            continue
        _health.answered(ep, blob)
        return True, result
    return False, None


class MirroredClient:
    """The registry operations a pull uses, tried on each endpoint of one image in order.

    Manifests by tag go only to endpoints trusted to resolve tags; everything else to those
    that may serve content.  Each endpoint's client verifies what it returns (manifest and
    blob digests, exact ranges); the TOC and chunk digests are checked by the caller."""

    def __init__(self, endpoints: list[Endpoint], repository: str,
                 client_factory: Callable[[Endpoint, bool], RegistryClient]) -> None:
        """`client_factory(endpoint, is_mirror)` makes the client of an endpoint (owned here)."""
        self.endpoints = endpoints
        self.repository = repository
        self.registry = endpoints[-1].registry
        self._make = client_factory
        self._clients: dict[tuple, RegistryClient] = {}
        self._lock = threading.Lock()

    def _client(self, ep: Endpoint) -> RegistryClient:
        with self._lock:
            c = self._clients.get(ep.key)
            if c is None:
                c = self._clients[ep.key] = self._make(ep, ep is not self.endpoints[-1])
            return c

    def _repo(self, ep: Endpoint, repository: str) -> str:
        return ep.repository if repository == self.repository else repository

    def _try(self, call: Callable[[RegistryClient, str], T], repository: str, what: str, *, tag: bool = False,
             blob: str | None = None) -> T:
        eps = [e for e in self.endpoints if (e.resolve if tag else e.pull)]
        errors: list[Exception] = []
        ok, result = _first_answer(eps, lambda ep: call(self._client(ep), self._repo(ep, repository)), errors,
                                   blob=blob)
        if not ok:
            raise _all_failed(errors, what)
        return result  # type: ignore[return-value]

    def get_manifest(self, repository: str, reference: str, **kw):
        tag = not reference.startswith(("sha256:", "sha512:"))
        return self._try(lambda c, repo: c.get_manifest(repo, reference, **kw), repository,
                         f"manifest {reference[:80]} of {repository}", tag=tag)

    def get_blob(self, repository: str, digest: str, *, max_size: int) -> bytes:
        return self._try(lambda c, repo: c.get_blob(repo, digest, max_size=max_size), repository, f"blob {digest}",
                         blob=digest)

    def get_range(self, repository: str, digest: str, start: int, end: int) -> bytes:
        return self._try(lambda c, repo: c.get_range(repo, digest, start, end), repository, f"blob {digest}",
                         blob=digest)

    def get_checked_range(self, repository: str, digest: str, start: int, end: int,
                          check: Callable[[bytes], T]) -> T:
        """check(bytes of [start, end)) from the first endpoint whose bytes it accepts: an
        endpoint whose bytes it refuses (FormatError: a footer or TOC that does not parse or
        match its digest) is passed over like one that failed.  If every endpoint's bytes are
        refused, BadContent."""
        from .formats.toc import FormatError

        def call(c: RegistryClient, repo: str) -> T:
            data = c.get_range(repo, digest, start, end)
            try:
                return check(data)
            except FormatError as e:
                raise BadContent(f"registry {c.registry}: {e}") from e

        return self._try(call, repository, f"blob {digest}", blob=digest)

    def get_ranges(self, repository: str, digest: str, ranges: list[tuple[int, int]], **kw) -> list[bytes]:
        return self._try(lambda c, repo: c.get_ranges(repo, digest, ranges, **kw), repository, f"blob {digest}",
                         blob=digest)

    def stream_blob(self, repository: str, digest: str, *, chunk_size: int = 1 << 20,
                    max_size: int | None = None) -> Iterator[bytes]:
        """The blob in chunks from the first endpoint that sends it.  If that endpoint fails
        mid-blob (after its own retries), the rest comes from the next endpoints as ranges,
        and the digest of the whole is checked here; a wrong digest at the end is final (the
        caller has consumed the bytes and discards what it built from them)."""
        from .registry.errors import BlobTooLarge, DigestMismatch
        from .registry.manifest import check_hash, hasher

        h = hasher(digest)

        def gen() -> Iterator[bytes]:
            errors: list[Exception] = []
            received = 0
            for ep in _health.order([e for e in self.endpoints if e.pull], digest):
                client, repo = self._client(ep), self._repo(ep, repository)
                try:
                    if received == 0:
                        for chunk in client.stream_blob(repo, digest, chunk_size=chunk_size, max_size=max_size):
                            h.update(chunk)
                            received += len(chunk)
                            yield chunk
                        return  # the endpoint's client checked the digest
                    size = client.blob_size(repo, digest)
                    if max_size is not None and size > max_size:
                        raise BlobTooLarge(f"registry {ep.registry}: blob {digest}: larger than {max_size} bytes")
                    while received < size:
                        data = client.get_range(repo, digest, received, min(size, received + chunk_size))
                        h.update(data)
                        received += len(data)
                        yield data
                    check_hash(h, digest, f"registry {ep.registry}: blob {digest} (resumed)")
                    _health.answered(ep, digest)
                    return
                except (DigestMismatch, BlobTooLarge):
                    raise
                except RegistryError as e:
                    _health.failed(ep, e, digest)
                    errors.append(e)
            raise _all_failed(errors, f"blob {digest}")

        return gen()

    def close(self) -> None:
        with self._lock:
            for c in self._clients.values():
                c.close()
            self._clients.clear()

    def __enter__(self) -> MirroredClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MirroredBlobSource:
    """A layer blob's ranges from the first endpoint that serves them: the endpoints of the
    container's own image first, the fallbacks (computed only when those all failed) next.

    An endpoint can answer with bytes that only the caller can find wrong (chunk digests):
    `last_origin()` names the endpoint of this thread's last read and `reject()` sets it
    aside for this blob, so the caller's next read goes to the next endpoint."""

    def __init__(self, digest: str, primary: Callable[[], list[Endpoint]],
                 fallback: Callable[[], list[Endpoint]],
                 client_for: Callable[[Endpoint], RegistryClient], limit: float) -> None:
        """`client_for(endpoint)`: a shared client; `limit`: seconds after which one read asks
        no further endpoint."""
        self.digest = digest
        self._groups = (primary, fallback)
        self._client_for = client_for
        self._lists: list[list[Endpoint] | LazyshimError | None] = [None, None]
        self._lock = threading.Lock()
        self._limit = limit
        self._last = threading.local()

    def last_origin(self) -> Endpoint | None:
        return getattr(self._last, "endpoint", None)

    def reject(self, endpoint: Endpoint) -> None:
        _health.distrust(endpoint, self.digest)

    def _group(self, i: int) -> list[Endpoint]:
        """Endpoint group i (deduplicated against the earlier ones), worked out once."""
        with self._lock:
            got = self._lists[i]
            if got is None:
                try:
                    earlier = {(e.registry, e.repository) for e in self._lists[0]} if i and isinstance(
                        self._lists[0], list) else set()
                    got = [e for e in self._groups[i]() if e.pull and (e.registry, e.repository) not in earlier]
                    got = list({(e.registry, e.repository): e for e in got}.values())
                except LazyshimError as e:  # a mirror configuration we cannot honour
                    got = e
                self._lists[i] = got
        if isinstance(got, LazyshimError):
            raise got
        return got

    def read_range(self, start: int, end: int) -> bytes:
        return self._read(lambda c, repo: c.get_range(repo, self.digest, start, end))

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        return self._read(lambda c, repo: c.get_ranges(repo, self.digest, ranges))

    def _read(self, call: Callable[[RegistryClient, str], T]) -> T:
        errors: list[Exception] = []
        deadline = time.monotonic() + self._limit
        for i in range(len(self._groups)):
            try:
                eps = self._group(i)
            except LazyshimError as e:
                errors.append(e)
                continue
            ok, result = _first_answer(
                eps, lambda ep: (ep, call(self._client_for(ep), ep.repository)), errors, deadline, self.digest)
            if ok:
                self._last.endpoint, data = result  # type: ignore[misc]
                return data
        raise _all_failed(errors, f"blob {self.digest}")
