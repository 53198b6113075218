"""The registry client's exception family.

Every expected failure (network down, 404, bad digest, refused credentials) surfaces as a
`RegistryError` with a one-line message that names the registry and the object, e.g.
`registry 127.0.0.1:5000: blob sha256:abcd12345678… in app: not found (404 BLOB_UNKNOWN)`,
so the CLI and the supervisor can print or log it without a traceback.  Callers that need
to react differently (retry elsewhere, fail the file, quarantine data) catch a subclass.
"""

from __future__ import annotations


class RegistryError(Exception):
    """Base class; `str(e)` is a single line fit for users."""

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class NotFound(RegistryError):
    """The registry answered 404 (or an index has no manifest for the platform)."""


class PlatformNotFound(NotFound):
    """An image index has no manifest for the requested os/architecture/variant."""


class DigestMismatch(RegistryError):
    """Content does not hash to the digest it was asked for: never use such bytes."""


class RegistryUnavailable(RegistryError):
    """Connection failures, timeouts, 5xx or 429 persisted through all retries."""


class Unauthorized(RegistryError):
    """401/403, or the token server refused us / could not be used safely."""


class ManifestInvalid(RegistryError):
    """A manifest or index is malformed, oversized, or of a media type we cannot use."""


class BlobTooLarge(RegistryError):
    """A blob or manifest exceeds the size bound the caller allowed."""


def one_line(text: str, limit: int = 400) -> str:
    """Collapse whitespace/control characters and cap the length, so messages stay one line."""
    cleaned = "".join(c if c.isprintable() else " " for c in str(text))
    cleaned = " ".join(cleaned.split())
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 1] + "…"


def short_digest(digest: str) -> str:
    """`sha256:abcd12345678…`: enough to recognise a digest in a message."""
    algo, _, hexpart = digest.partition(":")
    return f"{algo}:{hexpart[:12]}…" if len(hexpart) > 12 else digest
