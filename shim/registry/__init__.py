"""Registry client: references, auth, manifests, verified blobs and byte ranges, push.

The names below are loaded on first use (PEP 562): `shim.registry.errors` or
`.reference` alone must not pull in the HTTP client (httpx, ssl: ~60 ms), since every
`lazyshim` command imports the error classes and most never reach a registry.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "RegistryClient": "client", "coalesce_ranges": "client",
    "BlobTooLarge": "errors", "DigestMismatch": "errors", "ManifestInvalid": "errors", "NotFound": "errors",
    "PlatformNotFound": "errors", "RegistryError": "errors", "RegistryUnavailable": "errors",
    "Unauthorized": "errors",
    "Descriptor": "manifest", "Index": "manifest", "Manifest": "manifest",
    "InvalidReference": "reference", "Reference": "reference", "parse_reference": "reference",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
