"""Pure tests of image-reference parsing (no network)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shim.registry.reference import InvalidReference, Reference, parse_reference

D256 = "sha256:" + "ab" * 32
D512 = "sha512:" + "cd" * 64


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("busybox", Reference("docker.io", "library/busybox", "latest", None)),
        ("busybox:1.36", Reference("docker.io", "library/busybox", "1.36", None)),
        ("user/app", Reference("docker.io", "user/app", "latest", None)),
        ("index.docker.io/alpine", Reference("docker.io", "library/alpine", "latest", None)),
        ("docker.io/library/alpine:3", Reference("docker.io", "library/alpine", "3", None)),
        ("localhost/app", Reference("localhost", "app", "latest", None)),
        ("localhost:5000/a/b/c:v1", Reference("localhost:5000", "a/b/c", "v1", None)),
        ("127.0.0.1:5000/x@" + D256, Reference("127.0.0.1:5000", "x", None, D256)),
        ("quay.io/org/img:t@" + D512, Reference("quay.io", "org/img", "t", D512)),
        ("[::1]:5000/repo:tag", Reference("[::1]:5000", "repo", "tag", None)),
        ("ghcr.io/a-b/c__d.e_f", Reference("ghcr.io", "a-b/c__d.e_f", "latest", None)),
        ("Example/x", Reference("Example", "x", "latest", None)),
    ],
)
def test_parse(text: str, want: Reference) -> None:
    got = parse_reference(text)
    assert got == want
    assert parse_reference(str(got)) == got


def test_str_and_reference() -> None:
    r = parse_reference("localhost:5000/a:v1@" + D256)
    assert str(r) == "localhost:5000/a:v1@" + D256
    assert r.reference == D256
    assert parse_reference("busybox").reference == "latest"
    assert str(parse_reference("busybox")) == "docker.io/library/busybox:latest"


@pytest.mark.parametrize(
    "text",
    [
        "",
        " busybox",
        "busy box",
        "Busybox",
        "a//b",
        "/a",
        "a/",
        "host:5000/",
        "a:",
        "a:-tag",
        "a:" + "t" * 129,
        "a@sha256:abc",
        "a@md5:" + "0" * 32,
        "a@sha256:" + "AB" * 32,
        "a/b..c",
        "a/-b",
        "a\n",
        "a" * 300,
        ":tag",
        "@" + D256,
        "host:port:5000/a",
        "-host.com/a",
    ],
)
def test_invalid(text: str) -> None:
    with pytest.raises(InvalidReference) as exc:
        parse_reference(text)
    assert "\n" not in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_reference_constructor_validates() -> None:
    with pytest.raises(InvalidReference):
        Reference("localhost:5000", "UPPER", "t", None)
    with pytest.raises(InvalidReference):
        Reference("bad host", "a", "t", None)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=300))
def test_parse_only_raises_invalid_reference(text: str) -> None:
    try:
        ref = parse_reference(text)
    except InvalidReference as e:
        assert "\n" not in str(e)
        return
    assert parse_reference(str(ref)) == ref


_component = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,8}){0,2}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(
    host=st.sampled_from(["localhost", "localhost:5000", "127.0.0.1:5000", "reg.example.com", "docker.io"]),
    path=st.lists(_component, min_size=1, max_size=4),
    tag=st.none() | st.from_regex(r"\w[\w.-]{0,20}", fullmatch=True).filter(str.isascii),
    digest=st.none() | st.just(D256),
)
def test_roundtrip_generated(host: str, path: list[str], tag: str | None, digest: str | None) -> None:
    text = host + "/" + "/".join(path)
    if tag:
        text += ":" + tag
    if digest:
        text += "@" + digest
    ref = parse_reference(text)
    assert ref.registry == host
    if host != "docker.io" or len(path) > 1:
        assert ref.repository == "/".join(path)
    assert ref.digest == digest
    assert ref.tag == (tag or (None if digest else "latest"))
    assert parse_reference(str(ref)) == ref
