"""Registry clients for lazyshim, and blob sources backed by them (what a fill reads its
compressed ranges from).

Every client the shim creates comes from `new_client`, so the environment knobs apply
everywhere: LAZYSHIM_REGISTRY_RETRIES (retries per request, default 3) and
LAZYSHIM_REGISTRY_TIMEOUT (seconds per network operation, default 30; it also bounds the
total time spent retrying one request at four times that).

A container blocked in open() waits on the supervisor's requests, so those are bounded
harder: `LAZYSHIM_FETCH_TIMEOUT` (seconds, default 30) caps one fill's network time
including retries; after it the open fails with EIO and a later open tries again.
"""

from __future__ import annotations

import threading

from . import config
from .errors import LazyshimError
from .registry.client import RegistryClient

DEFAULT_FETCH_TIMEOUT = 30.0
RETRIES_ENV = "LAZYSHIM_REGISTRY_RETRIES"
TIMEOUT_ENV = "LAZYSHIM_REGISTRY_TIMEOUT"

_clients: dict[str, RegistryClient] = {}
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


def new_client(registry: str) -> RegistryClient:
    """A fresh client for `registry` with the environment's retry/timeout settings."""
    return RegistryClient(registry, **client_options())


def shared_client(registry: str) -> RegistryClient:
    """One client (one connection pool) per registry for the whole process."""
    with _lock:
        c = _clients.get(registry)
        if c is None:
            limit = fetch_timeout()
            c = _clients[registry] = RegistryClient(
                registry, timeout=max(1.0, limit / 3), retries=3, backoff=0.1, retry_time=limit)
        return c


class RegistryBlobSource:
    def __init__(self, registry: str, repository: str, digest: str) -> None:
        self.client = shared_client(registry)
        self.repository = repository
        self.digest = digest

    def read_range(self, start: int, end: int) -> bytes:
        return self.client.get_range(self.repository, self.digest, start, end)

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        return self.client.get_ranges(self.repository, self.digest, ranges)
