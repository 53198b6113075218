"""Registry client: references, auth, manifests, verified blobs and byte ranges, push."""

from .client import RegistryClient, coalesce_ranges
from .errors import (
    BlobTooLarge,
    DigestMismatch,
    ManifestInvalid,
    NotFound,
    PlatformNotFound,
    RegistryError,
    RegistryUnavailable,
    Unauthorized,
)
from .manifest import Descriptor, Index, Manifest
from .reference import InvalidReference, Reference, parse_reference

__all__ = [
    "BlobTooLarge",
    "Descriptor",
    "DigestMismatch",
    "Index",
    "InvalidReference",
    "Manifest",
    "ManifestInvalid",
    "NotFound",
    "PlatformNotFound",
    "Reference",
    "RegistryClient",
    "RegistryError",
    "RegistryUnavailable",
    "Unauthorized",
    "coalesce_ranges",
    "parse_reference",
]
