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
every fill, with fall-through (shim.endpoints).  Whatever endpoint answers, its bytes are
verified exactly as the origin's are; a fill whose bytes fail verification sets that endpoint
aside for the blob and reads them from the next (shim.store.filler).

A fill reads from the image the container runs (its references, with their mirrors),
then from the other images in the store that hold the layer, then from the registry that
first delivered the layer.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

from . import config
from .endpoints import MirroredBlobSource, MirroredClient
from .errors import LazyshimError
from .registry.client import RegistryClient
from .registry.mirrors import Endpoint, MirrorConfig
from .store.refs import image_references  # noqa: F401 - where callers of this module find it

DEFAULT_FETCH_TIMEOUT = 30.0
RETRIES_ENV = "LAZYSHIM_REGISTRY_RETRIES"
TIMEOUT_ENV = "LAZYSHIM_REGISTRY_TIMEOUT"

_clients: dict[tuple, RegistryClient] = {}
_lock = threading.Lock()


def fetch_timeout() -> float:
    try:
        v = float(config.get("fetch_timeout") or DEFAULT_FETCH_TIMEOUT)
    except ValueError:
        return DEFAULT_FETCH_TIMEOUT
    return v if v > 0 else DEFAULT_FETCH_TIMEOUT


def _env_number(name: str, default: float, lo: float, hi: float) -> float:
    raw = config.get(name.removeprefix("LAZYSHIM_").lower())
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


def pull_client(registry: str, repository: str, *, digested: bool,
                config: MirrorConfig | None = None) -> MirroredClient:
    """The client a pull of registry/repository uses: its mirrors first, then the origin."""
    config = mirror_config() if config is None else config
    return MirroredClient(config.resolve(registry, repository, digested=digested), repository,
                          lambda ep, mirror: new_client(ep, mirror=mirror))


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

        return MirroredBlobSource(digest, primary, fallback, lambda ep: shared_client(ep, mirror=ep.mirror),
                                  fetch_timeout())

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
