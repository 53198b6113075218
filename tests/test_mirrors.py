"""Mirror configuration (registries.conf v2, containerd hosts.toml) and the endpoint order it
gives, including hostile and odd files: each is a one-line MirrorConfigError or ignored as the
formats' own implementations ignore it."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.errors import LazyshimError
from shim.registry.mirrors import (
    Endpoint,
    Locations,
    MirrorConfig,
    MirrorConfigError,
    hosts_namespaces,
    load,
    locations,
    merge_registries,
    parse_hosts_toml,
    parse_registries_conf,
)


def _conf(text: str, hosts: dict[str, str] | None = None) -> MirrorConfig:
    files = {Path(f"/certs/{ns}/hosts.toml"): t.encode() for ns, t in (hosts or {}).items()}
    return MirrorConfig(parse_registries_conf(text, "test.conf"), Path("/certs") if hosts else None, files.get)


def _where(eps: list[Endpoint]) -> list[tuple[str, str]]:
    return [(e.registry, e.repository) for e in eps]


MIRRORED = """
unqualified-search-registries = ["docker.io"]
short-name-mode = "enforcing"

[[registry]]
location = "origin.example:5000"
insecure = false

[[registry.mirror]]
location = "mirror-a.example"
insecure = true

[[registry.mirror]]
location = "mirror-b.example:6000/cache"

[aliases]
"busybox" = "docker.io/library/busybox"
"""


def test_mirrors_come_first_in_order_then_the_origin() -> None:
    eps = _conf(MIRRORED).resolve("origin.example:5000", "app/py", digested=False)
    assert _where(eps) == [("mirror-a.example", "app/py"), ("mirror-b.example:6000", "cache/app/py"),
                           ("origin.example:5000", "app/py")]
    assert [e.insecure for e in eps] == [True, None, None]
    assert [e.mirror for e in eps] == [True, True, False]


def test_an_unconfigured_registry_is_its_own_only_endpoint() -> None:
    assert _where(_conf(MIRRORED).resolve("other.example", "x", digested=True)) == [("other.example", "x")]
    assert _where(MirrorConfig().resolve("docker.io", "library/busybox", digested=False)) == [
        ("docker.io", "library/busybox")]


def test_prefix_rewrites_to_location_and_the_longest_prefix_wins() -> None:
    conf = _conf("""
[[registry]]
prefix = "example.com"
location = "plain.example"

[[registry]]
prefix = "example.com/team"
location = "internal.example:5000/mirror/team"
[[registry.mirror]]
location = "near.example/t"
""")
    assert _where(conf.resolve("example.com", "team/app", digested=False)) == [
        ("near.example", "t/app"), ("internal.example:5000", "mirror/team/app")]
    assert _where(conf.resolve("example.com", "other/app", digested=False)) == [("plain.example", "other/app")]
    # "example.com/team" is not a prefix of "example.com/teamster": a prefix ends at a component
    assert _where(conf.resolve("example.com", "teamster", digested=False)) == [("plain.example", "teamster")]


def test_wildcard_prefix_matches_subdomains_only() -> None:
    conf = _conf("""
[[registry]]
prefix = "*.corp.example"
[[registry.mirror]]
location = "cache.example"
""")
    assert _where(conf.resolve("a.corp.example", "x/y", digested=False)) == [
        ("cache.example", "x/y"), ("a.corp.example", "x/y")]
    assert _where(conf.resolve("corp.example", "x", digested=False)) == [("corp.example", "x")]
    with pytest.raises(MirrorConfigError, match="wildcard prefix cannot have a location"):
        parse_registries_conf('[[registry]]\nprefix = "*.corp.example"\nlocation = "x.example"\n')


def test_blocked_registry_refuses_the_image() -> None:
    conf = _conf('[[registry]]\nlocation = "evil.example"\nblocked = true\n'
                 '[[registry.mirror]]\nlocation = "m.example"\n')
    with pytest.raises(MirrorConfigError, match=r"^registry evil.example is blocked in test.conf$"):
        conf.resolve("evil.example", "x", digested=True)
    assert isinstance(MirrorConfigError("x"), LazyshimError)


def test_pull_from_mirror_and_mirror_by_digest_only() -> None:
    conf = _conf("""
[[registry]]
location = "o.example"
[[registry.mirror]]
location = "digests.example"
pull-from-mirror = "digest-only"
[[registry.mirror]]
location = "tags.example"
pull-from-mirror = "tag-only"
[[registry.mirror]]
location = "any.example"

[[registry]]
location = "strict.example"
mirror-by-digest-only = true
[[registry.mirror]]
location = "m.example"
pull-from-mirror = "tag-only"
""")
    assert [e.registry for e in conf.resolve("o.example", "r", digested=True)] == [
        "digests.example", "any.example", "o.example"]
    assert [e.registry for e in conf.resolve("o.example", "r", digested=False)] == [
        "tags.example", "any.example", "o.example"]
    assert [e.registry for e in conf.resolve("strict.example", "r", digested=False)] == ["strict.example"]
    assert [e.registry for e in conf.resolve("strict.example", "r", digested=True)] == ["m.example", "strict.example"]


@pytest.mark.parametrize("text, message", [
    ('[[registry]]\nlocation = "a.example"\ninsecure = "yes"\n', "insecure must be true or false, not str"),
    ('[[registry]]\nlocation = 5\n', "location must be a string, not int"),
    ('registry = "a.example"\n', r"registry must be an array of tables"),
    ('[[registry]]\nlocation = "a.example"\nmirror = "m.example"\n', "mirror must be an array of tables"),
    ('[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\nlocation = "m.example"\n'
     'pull-from-mirror = "sometimes"\n', "pull-from-mirror must be one of all, digest-only, tag-only"),
    ('[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\ninsecure = true\n', "mirror #1: needs a location"),
    ('[[registry]]\nlocation = "https://a.example"\n', "URI schemes are not supported"),
    ('[[registry]]\nlocation = "a.example/UPPER"\n', "invalid repository"),
    ('[[registry]]\nlocation = "bad host!"\n', "invalid registry host"),
    ('[[registry]]\ninsecure = true\n', "needs a location or a prefix"),
    ("[[registry]\n", "not valid TOML"),
    ('[registries.search]\nregistries = ["a.example"]\n[[registry]]\nlocation = "b.example"\n', "mixing"),
    ('[registries.block]\nregistries = "a.example"\n', "must be a list of strings"),
])
def test_malformed_registries_conf_is_a_one_line_error(text: str, message: str) -> None:
    with pytest.raises(MirrorConfigError, match=message) as exc:
        parse_registries_conf(text, "/etc/containers/registries.conf")
    assert "\n" not in str(exc.value) and str(exc.value).startswith("/etc/containers/registries.conf")


def test_not_utf8_is_an_error() -> None:
    with pytest.raises(MirrorConfigError, match="not UTF-8"):
        parse_registries_conf(b"\xff\xfe[[registry]]", "f.conf")


def test_unknown_keys_and_tables_are_ignored() -> None:
    entries = parse_registries_conf("""
credential-helpers = ["containers-auth.json"]
[aliases]
"x" = "y.example/x"
[[registry]]
location = "a.example"
future-key = 3
[[registry.mirror]]
location = "m.example"
also-future = "x"
""")
    assert [(e.location, [m.location for m in e.mirrors]) for e in entries] == [("a.example", ["m.example"])]


def test_v1_lists_become_entries() -> None:
    conf = MirrorConfig(parse_registries_conf("""
[registries.search]
registries = ["docker.io"]
[registries.insecure]
registries = ["plain.example:5000"]
[registries.block]
registries = ["evil.example"]
"""))
    assert conf.resolve("plain.example:5000", "a", digested=False)[0].insecure is True
    with pytest.raises(MirrorConfigError, match="blocked"):
        conf.resolve("evil.example", "a", digested=False)


def test_drop_ins_replace_entries_with_the_same_prefix() -> None:
    entry = '[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\nlocation = "{}"\n'
    first = parse_registries_conf(entry.format("old.example"))
    second = parse_registries_conf(entry.format("new.example"))
    merged = merge_registries([first, second])
    assert [m.location for m in merged[0].mirrors] == ["new.example"] and len(merged) == 1


def test_locations_follow_the_environment(tmp_path: Path) -> None:
    assert locations({"LAZYSHIM_REGISTRIES_CONF": "/x.conf"}) == Locations(
        (Path("/x.conf"),), (Path("/x.conf"),), (), Path("/etc/containerd/certs.d"))
    podman = locations({"CONTAINERS_REGISTRIES_CONF": "/p.conf", "HOME": str(tmp_path)})
    assert podman.registries_conf == (Path("/p.conf"),) and podman.required == (Path("/p.conf"),)
    assert Path("/etc/containers/registries.conf.d") in podman.conf_dirs
    assert locations({"HOME": str(tmp_path)}).registries_conf == (Path("/etc/containers/registries.conf"),)
    user = tmp_path / ".config" / "containers" / "registries.conf"
    user.parent.mkdir(parents=True)
    user.write_text("")
    mine = locations({"HOME": str(tmp_path)})
    assert mine.registries_conf == (user,) and mine.conf_dirs == (user.with_name("registries.conf.d"),)
    assert locations({"LAZYSHIM_HOSTS_DIR": ""}).hosts_dir is None
    assert locations({"LAZYSHIM_HOSTS_DIR": "/h"}).hosts_dir == Path("/h")


def test_load_reads_drop_ins_in_order_and_needs_a_named_file(tmp_path: Path) -> None:
    main = tmp_path / "registries.conf"
    main.write_text('[[registry]]\nlocation = "a.example"\n')
    d = tmp_path / "registries.conf.d"
    d.mkdir()
    (d / "20-b.conf").write_text('[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\nlocation = "b.example"\n')
    (d / "10-c.conf").write_text('[[registry]]\nlocation = "a.example"\n[[registry.mirror]]\nlocation = "c.example"\n')
    (d / "ignored.txt").write_text("not toml [[")
    conf = load(Locations((main,), (), (d,), None))
    assert [e.registry for e in conf.resolve("a.example", "r", digested=False)] == ["b.example", "a.example"]
    with pytest.raises(MirrorConfigError, match="no such file"):
        load(Locations((tmp_path / "missing.conf",), (tmp_path / "missing.conf",), (), None))
    assert load(Locations((tmp_path / "missing.conf",), (), (tmp_path / "nodir",), None)).registries == []
    big = tmp_path / "big.conf"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(MirrorConfigError, match="larger than"):
        load(Locations((big,), (), (), None))


# --------------------------------------------------------------------------- hosts.toml


HOSTS = """
server = "https://origin.example:5000"

[host."http://pull-only.example:5001"]
  capabilities = ["pull"]

[host."https://trusted.example/v2"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
  ca = "/etc/certs/x.pem"
  [host."https://trusted.example/v2".header]
    x-custom = "1"

[host."https://push-only.example"]
  capabilities = ["push"]
"""


def test_hosts_toml_hosts_in_order_then_the_server() -> None:
    conf = _conf("", {"origin.example_5000_": HOSTS})
    eps = conf.resolve("origin.example:5000", "app", digested=False)
    assert _where(eps) == [("pull-only.example:5001", "app"), ("trusted.example", "app"),
                           ("origin.example:5000", "app")]
    assert [(e.insecure, e.skip_verify, e.resolve, e.pull) for e in eps] == [
        (True, False, False, True), (False, True, True, True), (False, False, True, True)]


def test_hosts_toml_namespace_order_and_default() -> None:
    assert hosts_namespaces("r.example:5000") == ["r.example_5000_", "r.example:5000", "_default"]
    assert hosts_namespaces("docker.io") == ["docker.io", "_default"]
    conf = _conf("", {"_default": '[host."http://everything.example"]\n'})
    assert _where(conf.resolve("any.example", "x", digested=True)) == [
        ("everything.example", "x"), ("any.example", "x")]
    only = _conf("", {"_default": 'server = "https://only.example"\n'})
    assert _where(only.resolve("any.example", "x", digested=True)) == [("only.example", "x")]


def test_registries_conf_mirrors_then_hosts_then_origin() -> None:
    conf = _conf('[[registry]]\nlocation = "o.example"\n[[registry.mirror]]\nlocation = "rc.example"\n',
                 {"o.example": '[host."https://ht.example"]\n'})
    assert [e.registry for e in conf.resolve("o.example", "x", digested=False)] == [
        "rc.example", "ht.example", "o.example"]


@pytest.mark.parametrize("text, message", [
    ('server = 5\n', "a host must be a non-empty string"),
    ('[host."ftp://m.example"]\n', "scheme must be http or https"),
    ('[host."https://m.example/custom/path"]\n', "a path other than /v2 is not supported"),
    ('[host."https://m.example"]\ncapabilities = "pull"\n', "capabilities must be a list of strings"),
    ('[host."https://m.example"]\nskip_verify = "no"\n', "skip_verify must be true or false"),
    ('host = "https://m.example"\n', "host must be a table"),
    ('[host."https://bad host"]\n', "invalid registry host"),
    ("server = \n", "not valid TOML"),
])
def test_malformed_hosts_toml_is_a_one_line_error(text: str, message: str) -> None:
    with pytest.raises(MirrorConfigError, match=message) as exc:
        parse_hosts_toml(text, "r.example", "/etc/containerd/certs.d/r.example/hosts.toml")
    assert "\n" not in str(exc.value)


def test_a_server_without_pull_leaves_only_the_hosts() -> None:
    conf = _conf("", {"r.example": 'capabilities = ["resolve"]\n[host."https://m.example"]\n'})
    assert [e.registry for e in conf.resolve("r.example", "x", digested=True)] == ["m.example"]
    none = _conf("", {"r.example": 'capabilities = []\n'})
    with pytest.raises(MirrorConfigError, match="leaves no registry"):
        none.resolve("r.example", "x", digested=True)
