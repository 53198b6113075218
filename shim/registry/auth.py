"""Registry credentials and the token-auth handshake.

Three layers, kept apart so each can be tested alone:

* pure parsing: `parse_auth_config` (containers auth.json / docker config.json),
  `parse_www_authenticate` (the 401 challenge) and `parse_token_response`;
* file lookup: `default_auth_files` and `find_credentials`, which read the usual places in
  the order podman/skopeo use;
* `Authenticator`: per-registry state shared by all threads of one `RegistryClient`.  It
  answers "what Authorization header does a request for this scope need?" and learns from
  401 challenges: Basic, or Bearer tokens fetched from the challenge's realm and cached
  per scope until shortly before they expire.  The HTTP call for a token is injected
  (`fetch_token`), so this module never imports an HTTP library.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: Tokens are dropped this many seconds before they expire, so a request never carries a
#: token that dies in flight.
EXPIRY_MARGIN = 10.0
#: The distribution token spec says a token without `expires_in` lives 60 seconds.
DEFAULT_TOKEN_LIFETIME = 60.0
MAX_AUTH_FILE = 1 << 20
_DOCKER_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io")


class AuthError(ValueError):
    """Credentials or a token response could not be parsed/used (one-line message)."""


@dataclass(frozen=True)
class Credentials:
    """A username/password pair, or an identity (refresh) token for the token server."""

    username: str = ""
    password: str = ""
    identity_token: str | None = None

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")

    def __repr__(self) -> str:  # never print secrets in logs or tracebacks
        return f"Credentials(username={self.username!r}, password=***)"


# --------------------------------------------------------------------------- parsing


def _normalise_key(key: str) -> str:
    """`https://index.docker.io/v1/` -> `docker.io`; `http://host:5000/` -> `host:5000`.

    Keys of containers auth.json may carry a repository namespace (`host/ns/repo`), which is
    kept so the most specific entry can win.
    """
    key = key.strip()
    for prefix in ("https://", "http://"):
        if key.startswith(prefix):
            key = key[len(prefix) :]
            # URL-style keys (docker's legacy form) name only the host; drop /v1/, /v2/.
            key = key.split("/", 1)[0]
            break
    key = key.rstrip("/")
    host, sep, path = key.partition("/")
    if host in _DOCKER_HUB_KEYS:
        host = "docker.io"
    return host + sep + path


def parse_auth_config(text: str | bytes) -> dict[str, Credentials]:
    """Parse an auth.json / config.json document into {normalised key: Credentials}.

    Entries we cannot use (credential helpers, broken base64) are skipped, not fatal: one
    stale entry must not break pulls from every other registry.  A document that is not a
    JSON object raises AuthError.
    """
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise AuthError(f"auth file is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise AuthError("auth file is not a JSON object")
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        return {}
    out: dict[str, Credentials] = {}
    for key, entry in auths.items():
        if not isinstance(key, str) or not isinstance(entry, dict):
            continue
        creds = _parse_entry(entry)
        if creds is not None:
            out[_normalise_key(key)] = creds
    return out


def _parse_entry(entry: Mapping[str, object]) -> Credentials | None:
    ident = entry.get("identitytoken")
    ident = ident if isinstance(ident, str) and ident else None
    auth = entry.get("auth")
    if isinstance(auth, str) and auth:
        try:
            decoded = base64.b64decode(auth, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        user, sep, password = decoded.partition(":")
        if not sep:
            return None
        return Credentials(user, password, ident)
    user, password = entry.get("username"), entry.get("password")
    if isinstance(user, str) and isinstance(password, str) and (user or password):
        return Credentials(user, password, ident)
    if ident:
        return Credentials("", "", ident)
    return None


@dataclass(frozen=True)
class Challenge:
    """One challenge of a `WWW-Authenticate` header: scheme (lowercased) and its parameters."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARAM_RE = re.compile(rf'\s*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_TOKEN}))\s*(,|$)')
_SCHEME_RE = re.compile(rf"\s*,?\s*({_TOKEN})(?:\s+|$)")


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse `Bearer realm="...",service="...",scope="a,b"` (quoted commas allowed).

    Never raises: garbage yields fewer/empty challenges, and the caller reports "no usable
    challenge" in its own words.
    """
    out: list[Challenge] = []
    pos, n = 0, len(header)
    while pos < n:
        m = _SCHEME_RE.match(header, pos)
        if not m:
            break
        scheme, pos = m.group(1).lower(), m.end()
        params: dict[str, str] = {}
        while pos < n:
            p = _PARAM_RE.match(header, pos)
            if not p:
                break
            value = p.group(2)
            value = re.sub(r"\\(.)", r"\1", value) if value is not None else p.group(3)
            params[p.group(1).lower()] = value
            pos = p.end()
        out.append(Challenge(scheme, params))
        if pos < n and not header[pos:].strip(" ,"):
            break
    return out


@dataclass(frozen=True)
class Token:
    value: str
    expires_at: float  # time.monotonic() deadline, already minus the safety margin


def parse_token_response(body: bytes, now: float) -> Token:
    """Parse the token server's JSON (`token` or `access_token`, optional `expires_in`)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise AuthError("token server returned invalid JSON") from None
    if not isinstance(doc, dict):
        raise AuthError("token server returned a non-object")
    value = doc.get("token") or doc.get("access_token")
    if not isinstance(value, str) or not value or any(c in value for c in "\r\n"):
        raise AuthError("token server response has no usable token")
    life = doc.get("expires_in", DEFAULT_TOKEN_LIFETIME)
    if isinstance(life, bool) or not isinstance(life, int | float) or life <= 0:
        life = DEFAULT_TOKEN_LIFETIME
    life = min(float(life), 24 * 3600.0)
    margin = min(EXPIRY_MARGIN, life / 4)
    return Token(value, now + life - margin)


# --------------------------------------------------------------------------- file lookup


def default_auth_files(env: Mapping[str, str] | None = None) -> list[Path]:
    """The auth files podman/skopeo consult, most specific first."""
    env = os.environ if env is None else env
    files: list[Path] = []
    if env.get("REGISTRY_AUTH_FILE"):
        files.append(Path(env["REGISTRY_AUTH_FILE"]))
    if env.get("XDG_RUNTIME_DIR"):
        files.append(Path(env["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    config = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
    files.append(config / "containers" / "auth.json")
    docker_dir = Path(env["DOCKER_CONFIG"]) if env.get("DOCKER_CONFIG") else home / ".docker"
    files.append(docker_dir / "config.json")
    return files


def match_credentials(
    table: Mapping[str, Credentials], registry: str, repository: str | None = None
) -> Credentials | None:
    """The most specific entry of `table` for registry[/repository] (namespace prefixes match)."""
    registry = _normalise_key(registry)
    if repository:
        parts = repository.split("/")
        for i in range(len(parts), 0, -1):
            hit = table.get(registry + "/" + "/".join(parts[:i]))
            if hit is not None:
                return hit
    return table.get(registry)


def find_credentials(
    registry: str, repository: str | None = None, files: Iterable[Path] | None = None
) -> Credentials | None:
    """First credentials for `registry` found in `files` (default: `default_auth_files()`).

    Unreadable or malformed files are skipped: a broken docker config must not stop a pull
    from a registry that needs no credentials at all.
    """
    for path in default_auth_files() if files is None else files:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_AUTH_FILE + 1)
        except OSError:
            continue
        if len(data) > MAX_AUTH_FILE:
            continue
        try:
            table = parse_auth_config(data)
        except AuthError:
            continue
        hit = match_credentials(table, registry, repository)
        if hit is not None:
            return hit
    return None


# --------------------------------------------------------------------------- handshake

#: fetch_token(realm, params, credentials) -> response body; raises on HTTP failure.
TokenFetcher = Callable[[str, list[tuple[str, str]], "Credentials | None"], bytes]


class Authenticator:
    """Authorization headers for one registry, learned from its 401 challenges.

    Thread-safe: many threads ask `header(scope)` concurrently; a token for a scope is
    fetched by one thread while others needing the same scope wait for it (per-scope lock),
    so a burst of range requests costs one token request, not thirty-two.
    """

    def __init__(
        self,
        credentials: Credentials | None,
        fetch_token: TokenFetcher,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.credentials = credentials
        self._fetch = fetch_token
        self._clock = clock
        self._lock = threading.Lock()
        self._scheme: str | None = None  # None until the first challenge; "basic" or "bearer"
        self._realm: str | None = None
        self._service: str | None = None
        self._tokens: dict[str, Token] = {}
        self._fetch_locks: dict[str, threading.Lock] = {}

    def header(self, scope: str) -> str | None:
        """The Authorization header to send proactively for `scope`, if we know the scheme."""
        with self._lock:
            scheme = self._scheme
        if scheme == "basic":
            return self.credentials.basic_header() if self.credentials else None
        if scheme == "bearer":
            return self._bearer(scope, rejected=None)
        return None

    def challenge(self, header_value: str, scope: str, rejected: str | None = None) -> str | None:
        """Learn from a 401's WWW-Authenticate; return a header to retry with, or None.

        `rejected` is the Authorization header the 401 answered.  None means "retrying
        cannot help" (no credentials for Basic, unknown scheme); the caller then reports
        the 401.  A token equal to `rejected` is never handed out again.
        """
        challenges = parse_www_authenticate(header_value or "")
        for ch in challenges:
            if ch.scheme == "bearer" and ch.params.get("realm"):
                with self._lock:
                    self._scheme = "bearer"
                    self._realm = ch.params["realm"]
                    self._service = ch.params.get("service")
                return self._bearer(scope, rejected=rejected or "", extra_scope=ch.params.get("scope"))
        for ch in challenges:
            if ch.scheme == "basic":
                with self._lock:
                    self._scheme = "basic"
                if self.credentials is None:
                    return None
                hdr = self.credentials.basic_header()
                return None if hdr == rejected else hdr
        return None

    def _cached(self, scope: str, rejected: str | None) -> str | None:
        tok = self._tokens.get(scope)
        if tok is None or tok.expires_at <= self._clock():
            return None
        hdr = "Bearer " + tok.value
        return None if hdr == rejected else hdr

    def _bearer(self, scope: str, *, rejected: str | None, extra_scope: str | None = None) -> str | None:
        with self._lock:
            hit = self._cached(scope, rejected)
            if hit is not None:
                return hit
            flock = self._fetch_locks.setdefault(scope, threading.Lock())
        with flock:
            with self._lock:
                # Another thread may have fetched a fresh token while we waited.
                hit = self._cached(scope, rejected)
                if hit is not None:
                    return hit
                realm, service = self._realm, self._service
            if realm is None:
                return None
            params: list[tuple[str, str]] = []
            if service:
                params.append(("service", service))
            scopes = [s for s in scope.split(" ") if s]
            for s in (extra_scope or "").split(" "):
                if s and s not in scopes:
                    scopes.append(s)
            params.extend(("scope", s) for s in scopes)
            body = self._fetch(realm, params, self.credentials)
            tok = parse_token_response(body, self._clock())
            with self._lock:
                self._tokens[scope] = tok
            hdr = "Bearer " + tok.value
            return None if hdr == rejected else hdr
