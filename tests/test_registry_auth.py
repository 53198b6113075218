"""Pure tests of auth-file parsing, challenge parsing and the token cache."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim.registry.auth import (
    Authenticator,
    AuthError,
    Credentials,
    default_auth_files,
    find_credentials,
    parse_auth_config,
    parse_token_response,
    parse_www_authenticate,
)


def _auth(user: str, pw: str) -> str:
    return base64.b64encode(f"{user}:{pw}".encode()).decode()


def test_parse_auth_config_forms() -> None:
    doc = {
        "auths": {
            "https://index.docker.io/v1/": {"auth": _auth("hub", "pw:with:colons")},
            "localhost:5000": {"auth": _auth("me", "secret")},
            "quay.io/org": {"username": "u", "password": "p"},
            "broken.example": {"auth": "!!!notbase64"},
            "helper.example": {},
        },
        "credHelpers": {"gcr.io": "gcloud"},
    }
    table = parse_auth_config(json.dumps(doc))
    assert table["docker.io"] == Credentials("hub", "pw:with:colons")
    assert table["localhost:5000"] == Credentials("me", "secret")
    assert table["quay.io/org"] == Credentials("u", "p")
    assert "broken.example" not in table and "helper.example" not in table
    assert "secret" not in repr(table["localhost:5000"])
    with pytest.raises(AuthError):
        parse_auth_config("[1]")
    with pytest.raises(AuthError):
        parse_auth_config("{")


def test_find_credentials_order_and_namespaces(tmp_path: Path) -> None:
    first = tmp_path / "auth.json"
    second = tmp_path / "config.json"
    first.write_text(json.dumps({"auths": {"quay.io/org/app": {"auth": _auth("app", "1")}}}))
    second.write_text(json.dumps({"auths": {"quay.io": {"auth": _auth("all", "2")}}}))
    files = [tmp_path / "missing.json", first, second]
    assert find_credentials("quay.io", "org/app/sub", files) == Credentials("app", "1")
    assert find_credentials("quay.io", "other/x", files) == Credentials("all", "2")
    assert find_credentials("ghcr.io", "x", files) is None


def test_default_auth_files() -> None:
    env = {"XDG_RUNTIME_DIR": "/run/user/1", "HOME": "/home/u"}
    assert default_auth_files(env) == [
        Path("/run/user/1/containers/auth.json"),
        Path("/home/u/.config/containers/auth.json"),
        Path("/home/u/.docker/config.json"),
    ]


def test_parse_www_authenticate() -> None:
    [ch] = parse_www_authenticate(
        'Bearer realm="https://auth.example/token",service="registry.example",'
        'scope="repository:a/b:pull,push"'
    )
    assert ch.scheme == "bearer"
    assert ch.params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
    }
    chs = parse_www_authenticate('Basic realm="x y"')
    assert chs[0].scheme == "basic" and chs[0].params == {"realm": "x y"}
    assert parse_www_authenticate('Bearer realm="a\\"b"')[0].params["realm"] == 'a"b'


@given(st.text(max_size=200))
def test_parse_www_authenticate_never_raises(text: str) -> None:
    parse_www_authenticate(text)


def test_parse_token_response() -> None:
    tok = parse_token_response(b'{"token": "abc", "expires_in": 300}', now=1000.0)
    assert tok.value == "abc" and tok.expires_at == 1000.0 + 300 - 10
    assert parse_token_response(b'{"access_token": "x"}', now=0).expires_at == 60 - 10
    for bad in (b"[]", b"{}", b'{"token": ""}', b"nope", b'{"token": "a\\nb"}'):
        with pytest.raises(AuthError):
            parse_token_response(bad, now=0)


def test_authenticator_bearer_caches_per_scope_and_expires() -> None:
    now = [0.0]
    calls: list[list[tuple[str, str]]] = []

    def fetch(realm: str, params: list[tuple[str, str]], creds: Credentials | None) -> bytes:
        assert realm == "http://127.0.0.1:1/token" and creds == Credentials("u", "p")
        calls.append(params)
        return json.dumps({"token": f"t{len(calls)}", "expires_in": 100}).encode()

    a = Authenticator(Credentials("u", "p"), fetch, clock=lambda: now[0])
    scope = "repository:x:pull"
    assert a.header(scope) is None  # no challenge seen yet
    hdr = a.challenge('Bearer realm="http://127.0.0.1:1/token",service="reg"', scope, None)
    assert hdr == "Bearer t1"
    assert calls[0] == [("service", "reg"), ("scope", scope)]
    assert a.header(scope) == "Bearer t1"  # cached
    assert a.header("repository:y:pull") == "Bearer t2"  # other scope, own token
    now[0] = 95.0  # inside the expiry margin: refreshed
    assert a.header(scope) == "Bearer t3"
    # A rejected token is never handed out again.
    assert a.challenge('Bearer realm="http://127.0.0.1:1/token"', scope, "Bearer t3") == "Bearer t4"


def test_authenticator_one_fetch_for_concurrent_threads() -> None:
    calls = []
    gate = threading.Event()

    def fetch(realm: str, params: list[tuple[str, str]], creds: Credentials | None) -> bytes:
        calls.append(1)
        gate.wait(2)
        return b'{"token": "shared"}'

    a = Authenticator(None, fetch)
    a.challenge('Bearer realm="http://127.0.0.1:1/t"', "s0", None)
    results: list[str | None] = []
    threads = [threading.Thread(target=lambda: results.append(a.header("s"))) for _ in range(16)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    assert results == ["Bearer shared"] * 16
    assert len(calls) == 2  # s0 once, s once


def test_authenticator_basic() -> None:
    a = Authenticator(Credentials("u", "p"), lambda *a: b"")
    hdr = a.challenge('Basic realm="r"', "s", None)
    assert hdr == "Basic " + _auth("u", "p")
    assert a.header("other") == hdr
    assert a.challenge('Basic realm="r"', "s", hdr) is None  # rejected creds: give up
    assert Authenticator(None, lambda *a: b"").challenge('Basic realm="r"', "s", None) is None
