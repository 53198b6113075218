"""Docker-style image references: `host[:port]/repo/path[:tag][@sha256:...]`.

The user types image names the way docker and podman accept them, so we parse them the same
way (a first component counts as a registry host only if it is `localhost` or contains `.`
or `:`, or has upper case; otherwise the name lives on Docker Hub, under `library/` when it
has a single component).  Everything is validated here, once, so the registry client can
put repository names and references into URLs without escaping surprises.  Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_REGISTRY = "docker.io"
DEFAULT_TAG = "latest"
#: Docker Hub's canonical name; older configs and users spell it in these ways too.
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})

MAX_NAME = 255  # distribution's limit for registry + "/" + repository
MAX_INPUT = 4096

# The grammar of github.com/distribution/reference, restricted to what we can fetch.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_RE = re.compile(rf"^(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?$")
_PATH_COMPONENT_RE = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG_RE = re.compile(r"^\w[\w.-]{0,127}$", re.ASCII)
#: Only digests we can verify: sha256 and sha512, lowercase hex of the right length.
DIGEST_RE = re.compile(r"^(?:sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")


class InvalidReference(ValueError):
    """An image reference, repository name, tag or digest is malformed (one-line message)."""


def _show(s: str) -> str:
    """Quote user input for an error message, keeping it on one short line."""
    r = repr(s)
    return r if len(r) <= 80 else r[:77] + "..."


def validate_digest(digest: str) -> str:
    """Return `digest` if it is a sha256/sha512 digest we can verify, else raise InvalidReference."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise InvalidReference(
            f"invalid digest {_show(str(digest))}: want sha256:<64 hex> or sha512:<128 hex>"
        )
    return digest


def validate_repository(repository: str) -> str:
    """Return `repository` if every path component is valid, else raise InvalidReference."""
    if not isinstance(repository, str) or not repository:
        raise InvalidReference("empty repository name")
    if len(repository) > MAX_NAME:
        raise InvalidReference(f"repository name longer than {MAX_NAME} characters: {_show(repository)}")
    for comp in repository.split("/"):
        if not _PATH_COMPONENT_RE.match(comp):
            raise InvalidReference(
                f"invalid repository name {_show(repository)}: component {_show(comp)} must be "
                "lowercase letters, digits and single separators (. _ __ -)"
            )
    return repository


def validate_tag(tag: str) -> str:
    """Return `tag` if valid (`[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`), else raise InvalidReference."""
    if not isinstance(tag, str) or not _TAG_RE.match(tag):
        raise InvalidReference(f"invalid tag {_show(str(tag))}")
    return tag


def validate_registry(registry: str) -> str:
    """Return `registry` (`host[:port]`) if valid, else raise InvalidReference."""
    if not isinstance(registry, str) or not _DOMAIN_RE.match(registry):
        raise InvalidReference(f"invalid registry host {_show(str(registry))}")
    return registry


@dataclass(frozen=True)
class Reference:
    """A parsed, validated image reference.

    `tag` and `digest` may both be set (`name:tag@digest`); the digest then wins when
    fetching, the tag is informational.  A reference with neither means `latest`, which
    `parse_reference` fills in, so `tag is None` implies `digest is not None`.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        validate_registry(self.registry)
        validate_repository(self.repository)
        if self.tag is not None:
            validate_tag(self.tag)
        if self.digest is not None:
            validate_digest(self.digest)
        if len(self.registry) + 1 + len(self.repository) > MAX_NAME:
            raise InvalidReference(f"image name longer than {MAX_NAME} characters")

    @property
    def reference(self) -> str:
        """What goes after `/manifests/` in a request: the digest if known, else the tag."""
        return self.digest or self.tag or DEFAULT_TAG

    @property
    def name(self) -> str:
        """`registry/repository` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        s = self.name
        if self.tag is not None:
            s += ":" + self.tag
        if self.digest is not None:
            s += "@" + self.digest
        return s


def parse_reference(s: str) -> Reference:
    """Parse a docker-style image reference; raise InvalidReference with a one-line message.

    `busybox` -> docker.io/library/busybox:latest; `localhost:5000/a/b@sha256:...` keeps no
    tag.  Docker Hub aliases are normalised to `docker.io` so credentials and caches key on
    one name.
    """
    if not isinstance(s, str):
        raise InvalidReference(f"image reference must be a string, not {type(s).__name__}")
    if not s:
        raise InvalidReference("empty image reference")
    if len(s) > MAX_INPUT:
        raise InvalidReference(f"image reference longer than {MAX_INPUT} characters")
    if s != s.strip() or any(c.isspace() or not c.isprintable() for c in s):
        raise InvalidReference(f"image reference contains whitespace or control characters: {_show(s)}")

    rest, digest = s, None
    if "@" in rest:
        rest, digest = rest.rsplit("@", 1)
        validate_digest(digest)
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        validate_tag(tag)
    if not rest:
        raise InvalidReference(f"image reference has no name: {_show(s)}")

    first, sep, remainder = rest.partition("/")
    if sep and (any(c in first for c in ".:") or first == "localhost" or first.lower() != first):
        registry, repository = first, remainder
    else:
        registry, repository = DEFAULT_REGISTRY, rest
    validate_registry(registry)
    if registry in _DOCKER_HUB_ALIASES:
        registry = DEFAULT_REGISTRY
        if "/" not in repository:
            repository = "library/" + repository
    validate_repository(repository)
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(registry, repository, tag, digest)
