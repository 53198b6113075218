"""Blob sources backed by a registry: what a fill reads its compressed ranges from."""

from __future__ import annotations

import threading

from .registry.client import RegistryClient

_clients: dict[str, RegistryClient] = {}
_lock = threading.Lock()


def shared_client(registry: str) -> RegistryClient:
    """One client (one connection pool) per registry for the whole process."""
    with _lock:
        c = _clients.get(registry)
        if c is None:
            c = _clients[registry] = RegistryClient(registry)
        return c


class RegistryBlobSource:
    def __init__(self, registry: str, repository: str, digest: str) -> None:
        self.client = shared_client(registry)
        self.repository = repository
        self.digest = digest

    def read_range(self, start: int, end: int) -> bytes:
        return self.client.get_range(self.repository, self.digest, start, end)
