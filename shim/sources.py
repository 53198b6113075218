"""Registry clients for lazyshim, the endpoints (mirrors, then origin) an image is read from,
and blob sources backed by them (what a fill reads its compressed ranges from).

Every client the shim creates comes from here, so the environment knobs apply
everywhere: LAZYSHIM_REGISTRY_RETRIES (retries per request, default 3) and
LAZYSHIM_REGISTRY_TIMEOUT (seconds per network operation, default 30; it also bounds the
total time spent retrying one request at four times that).

A container blocked in open() waits on the supervisor's requests, so those are bounded
harder: `LAZYSHIM_FETCH_TIMEOUT` (seconds, default 30) caps one fill's network time
including retries; after it the open fails with EIO and a later open tries again.

Mirrors (shim.registry.mirrors: registries.conf, hosts.toml; the files are found from
LAZYSHIM_REGISTRIES_CONF, CONTAINERS_REGISTRIES_CONF, HOME, XDG_CONFIG_HOME and
LAZYSHIM_HOSTS_DIR) are tried in order before the origin, for manifests, configs, TOCs and
every fill.  Any registry error of an endpoint (connection refused, 5xx, 404, a wrong
digest or range) moves on to the next one; for the next MIRROR_COOLDOWN seconds an
endpoint that did not answer at all is tried last, and one that failed a blob is tried
last for that blob, so a stopped mirror (or a cache that does not hold a blob yet) costs
one failed attempt, not one per file.  Whatever endpoint answers, its bytes are verified exactly as
the origin's are.

A fill reads from the image the container runs (its references, with their mirrors),
then from the other images in the store that hold the layer, then from the registry that
first delivered the layer.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from .errors import LazyshimError
from .registry.client import RegistryClient
from .registry.errors import RegistryError, RegistryUnavailable
from .registry.mirrors import Endpoint, MirrorConfig

T = TypeVar("T")

DEFAULT_FETCH_TIMEOUT = 30.0
MIRROR_COOLDOWN = 30.0
RETRIES_ENV = "LAZYSHIM_REGISTRY_RETRIES"
TIMEOUT_ENV = "LAZYSHIM_REGISTRY_TIMEOUT"

_clients: dict[tuple, RegistryClient] = {}
_lock = threading.Lock()


def fetch_timeout() -> float:
    try:
        v = float(os.environ.get("LAZYSHIM_FETCH_TIMEOUT", DEFAULT_FETCH_TIMEOUT))
    except ValueError:
        return DEFAULT_FETCH_TIMEOUT
    return v if v > 0 else DEFAULT_FETCH_TIMEOUT


def _env_number(name: str, default: float, lo: float, hi: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        v = float(raw)
    except ValueError:
        raise LazyshimError(f"${name}={raw[:40]!r} is not a number") from None
    if not lo <= v <= hi:
        raise LazyshimError(f"${name}={raw[:40]!r} is out of range [{lo:g}, {hi:g}]")
    return v


def client_options() -> dict:
    timeout = _env_number(TIMEOUT_ENV, 30.0, 0.1, 3600.0)
    retries = int(_env_number(RETRIES_ENV, 3, 0, 100))
    return {"timeout": timeout, "retries": retries, "retry_time": max(4 * timeout, 1.0)}


def mirror_config() -> MirrorConfig:
    """The node's mirror configuration, from the files the environment points at."""
    from .registry import mirrors

    return mirrors.load(mirrors.locations(os.environ))


def _transport(ep: Endpoint):
    if not ep.skip_verify:
        return None
    import httpx

    return httpx.HTTPTransport(verify=False, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))


def new_client(registry: str | Endpoint, *, mirror: bool = False) -> RegistryClient:
    """A fresh client for a registry or endpoint with the environment's retry/timeout settings;
    a mirror gets one retry, so a failing mirror hands over to the next endpoint soon."""
    opts = client_options()
    if mirror:
        opts["retries"] = min(opts["retries"], 1)
    if isinstance(registry, str):
        return RegistryClient(registry, **opts)
    return RegistryClient(registry.registry, insecure=registry.insecure, transport=_transport(registry), **opts)


def shared_client(registry: str | Endpoint, *, mirror: bool = False) -> RegistryClient:
    """One client (one connection pool) per endpoint for the whole process, bounded for fills:
    the origin may use the whole fetch timeout, a mirror a third of it."""
    ep = Endpoint(registry, "") if isinstance(registry, str) else registry
    key = (ep.key, mirror)
    with _lock:
        c = _clients.get(key)
        if c is None:
            limit = fetch_timeout()
            if mirror:
                opts = {"timeout": max(1.0, limit / 6), "retries": 1, "retry_time": max(1.0, limit / 3)}
            else:
                opts = {"timeout": max(1.0, limit / 3), "retries": 3, "retry_time": limit}
            c = _clients[key] = RegistryClient(ep.registry, insecure=ep.insecure, transport=_transport(ep),
                                               backoff=0.1, **opts)
        return c


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
                 client_factory: Callable[[Endpoint, bool], RegistryClient] | None = None) -> None:
        self.endpoints = endpoints
        self.repository = repository
        self.registry = endpoints[-1].registry
        self._make = client_factory or (lambda ep, mirror: new_client(ep, mirror=mirror))
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


def pull_client(registry: str, repository: str, *, digested: bool,
                config: MirrorConfig | None = None) -> MirroredClient:
    """The client a pull of registry/repository uses: its mirrors first, then the origin."""
    config = mirror_config() if config is None else config
    return MirroredClient(config.resolve(registry, repository, digested=digested), repository)


class MirroredBlobSource:
    """A layer blob's ranges from the first endpoint that serves them: the endpoints of the
    container's own image first, the fallbacks (computed only when those all failed) next."""

    def __init__(self, digest: str, primary: Callable[[], list[Endpoint]],
                 fallback: Callable[[], list[Endpoint]],
                 client_for: Callable[[Endpoint], RegistryClient] | None = None) -> None:
        self.digest = digest
        self._groups = (primary, fallback)
        self._client_for = client_for or (lambda ep: shared_client(ep, mirror=ep.mirror))
        self._lists: list[list[Endpoint] | LazyshimError | None] = [None, None]
        self._lock = threading.Lock()
        self._limit = fetch_timeout()

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
                eps, lambda ep: call(self._client_for(ep), ep.repository), errors, deadline, self.digest)
            if ok:
                return result  # type: ignore[return-value]
        raise _all_failed(errors, f"blob {self.digest}")


class FillSources:
    """Where the fills of one container come from.

    `references` are the image(s) the container runs.  Without them (a bundle found by
    its overlay), the images in the store whose layers are exactly `layers` stand in.
    Fallbacks, asked only when those fail: the other images in the store that hold the
    layer, then the registry the layer was first pulled from."""

    def __init__(self, store, references: Sequence[str] = (), layers: Sequence[str] = ()) -> None:
        self.store = store
        self.references = list(references)
        self.layers = list(layers)
        self._lock = threading.Lock()
        self._config: MirrorConfig | None = None
        self._images: list[tuple[str, list[str]]] | None = None
        self._resolved: dict[str, list[Endpoint]] = {}

    def source(self, digest: str, first_registry: str = "", first_repository: str = "") -> MirroredBlobSource:
        def primary() -> list[Endpoint]:
            names = self.references or [n for n, layers in self._store_images() if layers == self.layers]
            return self._endpoints(names)

        def fallback() -> list[Endpoint]:
            names = [n for n, layers in self._store_images() if digest in layers]
            eps = self._endpoints(names)
            if first_registry and first_repository:
                eps += self._resolve(f"{first_registry}/{first_repository}", first_registry, first_repository, False)
            return eps

        return MirroredBlobSource(digest, primary, fallback)

    def _endpoints(self, names: list[str]) -> list[Endpoint]:
        from .registry.reference import InvalidReference, parse_reference

        out: list[Endpoint] = []
        errors: list[LazyshimError] = []
        for name in names:
            try:
                ref = parse_reference(name)
            except InvalidReference:
                continue
            try:
                out += self._resolve(name, ref.registry, ref.repository, ref.digest is not None)
            except LazyshimError as e:  # e.g. blocked: the other names may still serve
                errors.append(e)
        if not out and errors:
            raise errors[0]
        return out

    def _resolve(self, key: str, registry: str, repository: str, digested: bool) -> list[Endpoint]:
        with self._lock:
            hit = self._resolved.get(key)
            if hit is None:
                if self._config is None:
                    self._config = mirror_config()
                hit = self._resolved[key] = self._config.resolve(registry, repository, digested=digested)
            return hit

    def _store_images(self) -> list[tuple[str, list[str]]]:
        """(name, layers) of every image the store knows by name, read once per process."""
        with self._lock:
            if self._images is None:
                self._images = _named_images(self.store)
            return self._images


def _named_images(store) -> list[tuple[str, list[str]]]:
    from .store.metadata import load_image
    from .store.refs import load_refs

    out, records = [], {}
    try:
        names = sorted(load_refs(store).items())
    except LazyshimError:
        return []
    for name, image_id in names:
        if image_id not in records:
            try:
                records[image_id] = load_image(store.image_file(image_id).read_bytes()).layers
            except (LazyshimError, OSError):
                records[image_id] = None
        if records[image_id] is not None:
            out.append((name, records[image_id]))
    return out


def image_references(store, image, asked: str | None = None) -> list[str]:
    """The names a pulled image is known by, where its fills may come from: the name the
    user asked for first (one manifest may have been pulled from several registries), then
    the one it was last pulled as, then the others."""
    from .registry.reference import InvalidReference, parse_reference
    from .store.refs import load_refs

    try:
        known = sorted(n for n, i in load_refs(store).items() if i == image.id)
    except LazyshimError:
        known = []
    first = []
    if asked:
        try:
            name = str(parse_reference(asked))
        except InvalidReference:
            name = ""
        if name in known:
            first.append(name)
    names = first + [image.name] + known
    return list(dict.fromkeys(names))


_fill_sources: dict[tuple, FillSources] = {}


def fill_sources(store, references: Sequence[str], layers: Sequence[str]) -> FillSources:
    """One FillSources per container view for the whole process (shares its lookups)."""
    key = (str(store.root), tuple(references), tuple(layers))
    with _lock:
        fs = _fill_sources.get(key)
        if fs is None:
            fs = _fill_sources[key] = FillSources(store, references, layers)
        return fs


class RegistryBlobSource:
    """A layer blob's ranges from one registry, no mirrors (for callers that name it)."""

    def __init__(self, registry: str, repository: str, digest: str) -> None:
        self.client = shared_client(registry)
        self.repository = repository
        self.digest = digest

    def read_range(self, start: int, end: int) -> bytes:
        return self.client.get_range(self.repository, self.digest, start, end)

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        return self.client.get_ranges(self.repository, self.digest, ranges)
