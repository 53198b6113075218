"""Blob sources backed by a registry: what a fill reads its compressed ranges from.

A container blocked in open() waits on these requests, so their patience is bounded:
`LAZYSHIM_FETCH_TIMEOUT` (seconds, default 30) caps one fill's network time including
retries; after it the open fails with EIO and a later open tries again.
"""

from __future__ import annotations

import os
import threading

from .registry.client import RegistryClient

DEFAULT_FETCH_TIMEOUT = 30.0

_clients: dict[str, RegistryClient] = {}
_lock = threading.Lock()


def fetch_timeout() -> float:
    try:
        v = float(os.environ.get("LAZYSHIM_FETCH_TIMEOUT", DEFAULT_FETCH_TIMEOUT))
    except ValueError:
        return DEFAULT_FETCH_TIMEOUT
    return v if v > 0 else DEFAULT_FETCH_TIMEOUT


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
