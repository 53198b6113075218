"""Registry mirrors: which endpoints serve an image, in which order.

Two configuration formats exist in the field and both are read:

* containers-registries.conf(5) v2 (podman, CRI-O, skopeo): `[[registry]]` tables with
  `prefix`, `location`, `insecure`, `blocked`, `mirror-by-digest-only` and
  `[[registry.mirror]]` entries (`location`, `insecure`, `pull-from-mirror` = all |
  digest-only | tag-only).  The longest matching prefix decides; the matched prefix of the
  image name is replaced by the mirror's (or the registry's) location, so a mirror may keep
  its copy under another namespace.  A blocked registry refuses the image altogether, as
  podman does.  Later files (drop-ins) replace entries with the same prefix.
* containerd's hosts.toml (`CERTS_DIR/<host>/hosts.toml`, `<host>_<port>_`, `_default`):
  `server` (the upstream, default the image's own host), `capabilities`, `skip_verify`,
  and `[host."URL"]` entries tried in the order written.  A host without "resolve" is not
  asked to turn a tag into a manifest; one without "pull" serves nothing we need.

`MirrorConfig.resolve` turns (registry, repository, by digest?) into endpoints: the
registries.conf mirrors, then the hosts.toml hosts, then the origin.  Nothing here trusts
an endpoint: callers verify every byte against the digests of the image as they do for the
origin.  Parsing is pure (text in, objects out); file reading is confined to `load` and
`MirrorConfig.hosts_for`; where the files are comes from `locations(env)`, which callers
give the environment they read in one place.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LazyshimError
from .reference import InvalidReference, validate_registry, validate_repository

MAX_CONFIG_FILE = 1 << 20
MAX_ENTRIES = 256
PULL_FROM_MIRROR = ("all", "digest-only", "tag-only")
CAPABILITIES = ("pull", "resolve", "push")
SYSTEM_REGISTRIES_CONF = Path("/etc/containers/registries.conf")
DEFAULT_HOSTS_DIR = Path("/etc/containerd/certs.d")


class MirrorConfigError(LazyshimError):
    """A registries.conf or hosts.toml we cannot honour, or an image its registry blocks."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One place to fetch an image's content from.

    `insecure`: True allows plain HTTP, False forces https, None leaves it to the client's
    default (loopback and $LAZYSHIM_INSECURE_REGISTRIES are plain HTTP).  `skip_verify`:
    https without certificate checks (hosts.toml).  `resolve`: may turn a tag into a
    manifest; `pull`: may serve manifests by digest and blobs.
    """

    registry: str
    repository: str
    insecure: bool | None = None
    skip_verify: bool = False
    mirror: bool = False
    resolve: bool = True
    pull: bool = True

    @property
    def key(self) -> tuple:
        """What makes two endpoints share one client (connection pool, credentials)."""
        return (self.registry, self.insecure, self.skip_verify)


@dataclass(frozen=True, slots=True)
class MirrorEntry:
    location: str
    insecure: bool = False
    pull_from_mirror: str = "all"


@dataclass(frozen=True, slots=True)
class RegistryEntry:
    """One `[[registry]]` table, normalised (prefix defaults to the location)."""

    prefix: str
    location: str
    insecure: bool = False
    blocked: bool = False
    mirror_by_digest_only: bool = False
    mirrors: tuple[MirrorEntry, ...] = ()
    source: str = ""

    def matches(self, name: str) -> int:
        """Length of the part of `name` (host/repository) this entry's prefix matches, or 0."""
        prefix = self.prefix
        if prefix.startswith("*."):  # a wildcard names any subdomain of a host
            host = name.split("/", 1)[0]
            return len(host) if host.endswith(prefix[1:]) else 0
        if name == prefix or (name.startswith(prefix) and name[len(prefix)] in "/:@"):
            return len(prefix)
        return 0


@dataclass(frozen=True, slots=True)
class HostUrl:
    """A `server` or `[host."URL"]` of hosts.toml."""

    registry: str
    insecure: bool | None
    skip_verify: bool = False
    resolve: bool = True
    pull: bool = True


@dataclass(frozen=True, slots=True)
class HostsConfig:
    server: HostUrl | None
    hosts: tuple[HostUrl, ...] = ()
    source: str = ""


@dataclass(frozen=True, slots=True)
class Locations:
    """Where the configuration files are (see `locations`)."""

    registries_conf: tuple[Path, ...] = ()  # files, read in order; later ones override
    required: tuple[Path, ...] = ()  # of those, the ones that must exist (named explicitly)
    conf_dirs: tuple[Path, ...] = ()  # drop-in directories of *.conf files
    hosts_dir: Path | None = None


def locations(env: Mapping[str, str]) -> Locations:
    """The file locations podman and containerd use, or those the environment names.

    `LAZYSHIM_REGISTRIES_CONF=FILE`: that file alone (no drop-ins).  Else
    `CONTAINERS_REGISTRIES_CONF=FILE` (as podman reads it) or the per-user file if it
    exists, else /etc/containers/registries.conf; then the drop-in directories.
    `LAZYSHIM_HOSTS_DIR` replaces /etc/containerd/certs.d (empty: no hosts.toml at all).
    """
    home = Path(env["HOME"]) if env.get("HOME") else None
    config_home = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else (
        home / ".config" if home else None)
    hosts_env = env.get("LAZYSHIM_HOSTS_DIR")
    hosts_dir = DEFAULT_HOSTS_DIR if hosts_env is None else (Path(hosts_env) if hosts_env else None)
    own = env.get("LAZYSHIM_REGISTRIES_CONF")
    if own:
        return Locations((Path(own),), (Path(own),), (), hosts_dir)
    user_file = config_home / "containers" / "registries.conf" if config_home else None
    dirs = [SYSTEM_REGISTRIES_CONF.with_name("registries.conf.d")]
    if user_file is not None:
        dirs.append(user_file.with_name("registries.conf.d"))
    podman = env.get("CONTAINERS_REGISTRIES_CONF")
    if podman:
        return Locations((Path(podman),), (Path(podman),), tuple(dirs), hosts_dir)
    if user_file is not None and user_file.exists():
        return Locations((user_file,), (), (dirs[-1],), hosts_dir)  # as podman: the user's file replaces the system's
    return Locations((SYSTEM_REGISTRIES_CONF,), (), tuple(dirs), hosts_dir)


# --------------------------------------------------------------------------- registries.conf


def _bool(table: Mapping, key: str, where: str) -> bool:
    v = table.get(key, False)
    if not isinstance(v, bool):
        raise MirrorConfigError(f"{where}: {key} must be true or false, not {type(v).__name__}")
    return v


def _location(value: object, key: str, where: str, wildcard: bool = False) -> str:
    """A `host[:port][/namespace...]` (no scheme, no trailing slash), as containers/image checks it."""
    if not isinstance(value, str):
        raise MirrorConfigError(f"{where}: {key} must be a string, not {type(value).__name__}")
    loc = value.rstrip("/")
    if not loc:
        raise MirrorConfigError(f"{where}: {key} cannot be empty")
    if loc.startswith(("http://", "https://")):
        raise MirrorConfigError(f"{where}: {key} {value[:80]!r}: URI schemes are not supported")
    host, _, path = loc.partition("/")
    if wildcard and loc.startswith("*."):
        host = host[2:]
    try:
        validate_registry(host)
        if path:  # a prefix may name a repository, even with a tag or digest
            repo = path.split("@", 1)[0]
            if ":" in repo.rsplit("/", 1)[-1]:
                repo = repo.rsplit(":", 1)[0]
            validate_repository(repo)
    except InvalidReference as e:
        raise MirrorConfigError(f"{where}: {key} {value[:80]!r}: {e}") from None
    return loc


def _load_toml(text: str | bytes, source: str) -> dict:
    """One TOML document of a config file; undecodable or invalid text is one MirrorConfigError."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise MirrorConfigError(f"{source}: not UTF-8 text") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MirrorConfigError(f"{source}: not valid TOML: {e}") from None


def parse_registries_conf(text: str | bytes, source: str = "registries.conf") -> list[RegistryEntry]:
    """The `[[registry]]` entries of one registries.conf (v2; v1's insecure/block lists are
    converted).  Unknown keys are ignored, as containers/image does; wrong types and
    invalid locations raise MirrorConfigError naming the file."""
    doc = _load_toml(text, source)
    regs = doc.get("registry", [])
    v1 = doc.get("registries")
    if v1 is not None:
        if regs:
            raise MirrorConfigError(f"{source}: mixing registries.conf v1 and v2 is not supported")
        return _from_v1(v1, source)
    if not isinstance(regs, list):
        raise MirrorConfigError(f"{source}: registry must be an array of tables ([[registry]])")
    if len(regs) > MAX_ENTRIES:
        raise MirrorConfigError(f"{source}: more than {MAX_ENTRIES} [[registry]] entries")
    out = []
    for i, reg in enumerate(regs, 1):
        where = f"{source}: [[registry]] #{i}"
        if not isinstance(reg, dict):
            raise MirrorConfigError(f"{where}: not a table")
        prefix_raw = reg.get("prefix")
        location = _location(reg["location"], "location", where) if reg.get("location") not in (None, "") else ""
        if prefix_raw in (None, ""):
            if not location:
                raise MirrorConfigError(f"{where}: needs a location or a prefix")
            prefix = location
        else:
            prefix = _location(prefix_raw, "prefix", where, wildcard=True)
        if prefix.startswith("*.") and location:
            raise MirrorConfigError(f"{where}: a wildcard prefix cannot have a location")
        mirrors_raw = reg.get("mirror", [])
        if not isinstance(mirrors_raw, list):
            raise MirrorConfigError(f"{where}: mirror must be an array of tables ([[registry.mirror]])")
        if len(mirrors_raw) > MAX_ENTRIES:
            raise MirrorConfigError(f"{where}: more than {MAX_ENTRIES} mirrors")
        mirrors = []
        for j, m in enumerate(mirrors_raw, 1):
            mwhere = f"{where} mirror #{j}"
            if not isinstance(m, dict):
                raise MirrorConfigError(f"{mwhere}: not a table")
            if m.get("location") in (None, ""):
                raise MirrorConfigError(f"{mwhere}: needs a location")
            mode = m.get("pull-from-mirror", "all") or "all"
            if mode not in PULL_FROM_MIRROR:
                raise MirrorConfigError(f"{mwhere}: pull-from-mirror must be one of {', '.join(PULL_FROM_MIRROR)}")
            mirrors.append(MirrorEntry(_location(m["location"], "location", mwhere), _bool(m, "insecure", mwhere),
                                       mode))
        out.append(RegistryEntry(
            prefix=prefix, location=location, insecure=_bool(reg, "insecure", where),
            blocked=_bool(reg, "blocked", where),
            mirror_by_digest_only=_bool(reg, "mirror-by-digest-only", where), mirrors=tuple(mirrors), source=source,
        ))
    return out


def _from_v1(v1: object, source: str) -> list[RegistryEntry]:
    """v1's `[registries.insecure] registries = [...]` and `[registries.block]` as v2 entries."""
    if not isinstance(v1, dict):
        raise MirrorConfigError(f"{source}: registries must be a table")
    flags: dict[str, dict[str, bool]] = {}
    for kind in ("block", "insecure"):
        table = v1.get(kind, {})
        names = table.get("registries", []) if isinstance(table, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise MirrorConfigError(f"{source}: registries.{kind}.registries must be a list of strings")
        for n in names:
            flags.setdefault(_location(n, f"registries.{kind}", source), {})[kind] = True
    return [RegistryEntry(prefix=loc, location=loc, insecure=f.get("insecure", False), blocked=f.get("block", False),
                          source=source) for loc, f in flags.items()]


def merge_registries(files: list[list[RegistryEntry]]) -> list[RegistryEntry]:
    """Entries of several files, a later file's entry replacing an earlier one with the same prefix."""
    merged: dict[str, RegistryEntry] = {}
    for entries in files:
        for e in entries:
            merged.pop(e.prefix, None)
            merged[e.prefix] = e
    return list(merged.values())


# --------------------------------------------------------------------------- hosts.toml


def _host_url(url: object, where: str, table: Mapping) -> HostUrl | None:
    """A server or host URL with its capabilities; None when it can do nothing for a pull."""
    if not isinstance(url, str) or not url:
        raise MirrorConfigError(f"{where}: a host must be a non-empty string")
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if scheme not in ("", "http", "https"):
        raise MirrorConfigError(f"{where}: {url[:80]!r}: scheme must be http or https")
    host, _, path = rest.partition("/")
    if path.strip("/") not in ("", "v2"):
        raise MirrorConfigError(f"{where}: {url[:80]!r}: a path other than /v2 is not supported")
    try:
        validate_registry(host)
    except InvalidReference as e:
        raise MirrorConfigError(f"{where}: {e}") from None
    caps = table.get("capabilities", list(CAPABILITIES))
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise MirrorConfigError(f"{where}: capabilities must be a list of strings")
    skip = table.get("skip_verify", False)
    if not isinstance(skip, bool):
        raise MirrorConfigError(f"{where}: skip_verify must be true or false")
    if "pull" not in caps:
        return None
    insecure = {"http": True, "https": False}.get(scheme)
    return HostUrl(host, insecure, skip, resolve="resolve" in caps, pull=True)


def parse_hosts_toml(text: str | bytes, namespace: str, source: str = "hosts.toml") -> HostsConfig:
    """One hosts.toml for the registry host `namespace` (the server when none is named).
    Unknown keys (ca, client, header, dial_timeout...) are ignored."""
    doc = _load_toml(text, source)
    server = _host_url(doc.get("server", namespace), f"{source}: server", doc)
    hosts_raw = doc.get("host", {})
    if not isinstance(hosts_raw, dict):
        raise MirrorConfigError(f'{source}: host must be a table of [host."URL"] tables')
    if len(hosts_raw) > MAX_ENTRIES:
        raise MirrorConfigError(f"{source}: more than {MAX_ENTRIES} hosts")
    hosts = []
    for url, table in hosts_raw.items():
        if not isinstance(table, dict):
            raise MirrorConfigError(f'{source}: host."{url[:80]}" must be a table')
        h = _host_url(url, f'{source}: host."{url[:80]}"', table)
        if h is not None:
            hosts.append(h)
    return HostsConfig(server, tuple(hosts), source)


def hosts_namespaces(registry: str) -> list[str]:
    """The directories containerd looks in for `registry`'s hosts.toml, in order."""
    host, sep, port = registry.rpartition(":")
    names = [f"{host}_{port}_", registry] if sep and port.isdigit() and "]" not in port else [registry]
    return names + ["_default"]


# --------------------------------------------------------------------------- resolution


def _split_name(name: str, where: str) -> tuple[str, str]:
    registry, _, repository = name.partition("/")
    try:
        validate_registry(registry)
        validate_repository(repository)
    except InvalidReference as e:
        raise MirrorConfigError(f"{where}: rewritten name {name[:120]!r}: {e}") from None
    return registry, repository


@dataclass
class MirrorConfig:
    """Mirror configuration of a node: registries.conf entries and a hosts.toml directory."""

    registries: list[RegistryEntry] = field(default_factory=list)
    hosts_dir: Path | None = None
    read_file: Callable[[Path], bytes | None] = field(default=lambda p: _read_small(p), repr=False)
    _hosts_cache: dict[str, HostsConfig | None] = field(default_factory=dict, repr=False)

    def registry_for(self, name: str) -> RegistryEntry | None:
        """The [[registry]] with the longest prefix matching `host/repository`."""
        best, best_len = None, 0
        for r in self.registries:
            n = r.matches(name)
            if n > best_len:
                best, best_len = r, n
        return best

    def hosts_for(self, registry: str) -> HostsConfig | None:
        """The hosts.toml that applies to `registry`, read on first use, or None."""
        if self.hosts_dir is None:
            return None
        if registry in self._hosts_cache:
            return self._hosts_cache[registry]
        found = None
        for ns in hosts_namespaces(registry):
            path = self.hosts_dir / ns / "hosts.toml"
            data = self.read_file(path)
            if data is not None:  # without a server, even _default's upstream is the image's own host
                found = parse_hosts_toml(data, registry, str(path))
                break
        self._hosts_cache[registry] = found
        return found

    def resolve(self, registry: str, repository: str, *, digested: bool) -> list[Endpoint]:
        """Endpoints for the image `registry/repository` (pulled by digest or by tag), mirrors
        first, the origin last; MirrorConfigError if its registry is blocked."""
        name = f"{registry}/{repository}"
        out: list[Endpoint] = []
        reg = self.registry_for(name)
        origin = Endpoint(registry, repository)
        if reg is not None:
            if reg.blocked:
                raise MirrorConfigError(f"registry {reg.prefix} is blocked in {reg.source}")
            matched = reg.matches(name)
            rest = name[matched:]
            for m in reg.mirrors:
                wanted = "digest-only" if reg.mirror_by_digest_only else m.pull_from_mirror
                if (wanted == "digest-only" and not digested) or (wanted == "tag-only" and digested):
                    continue
                r, p = _split_name(m.location + rest, f"{reg.source}: mirror {m.location}")
                out.append(Endpoint(r, p, True if m.insecure else None, mirror=True))
            location = reg.location or name[:matched]
            r, p = _split_name(location + rest, f"{reg.source}: location {location}")
            origin = Endpoint(r, p, True if reg.insecure else None)
        hosts = self.hosts_for(origin.registry)
        if hosts is not None:
            for h in hosts.hosts:
                out.append(Endpoint(h.registry, origin.repository, h.insecure, h.skip_verify, True, h.resolve, h.pull))
            s = hosts.server
            origin = None if s is None else Endpoint(
                s.registry, origin.repository, s.insecure if s.insecure is not None else origin.insecure,
                s.skip_verify, s.registry != origin.registry, s.resolve, s.pull)
        if origin is not None:
            out.append(origin)
        seen: set[tuple] = set()
        unique = []
        for e in out:
            if (e.registry, e.repository) not in seen:
                seen.add((e.registry, e.repository))
                unique.append(e)
        if not unique:
            raise MirrorConfigError(f"{name}: the mirror configuration leaves no registry to pull from")
        return unique


def _read_small(path: Path) -> bytes | None:
    """A config file's bytes, None if absent; too big or unreadable is an error."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_FILE + 1)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except OSError as e:
        raise MirrorConfigError(f"{path}: {e.strerror}") from None
    if len(data) > MAX_CONFIG_FILE:
        raise MirrorConfigError(f"{path}: larger than {MAX_CONFIG_FILE} bytes")
    return data


def load(where: Locations, read_file: Callable[[Path], bytes | None] = _read_small) -> MirrorConfig:
    """Read the files `where` names (drop-ins in name order after the main file)."""
    files: list[list[RegistryEntry]] = []
    for path in where.registries_conf:
        data = read_file(path)
        if data is None:
            if path in where.required:
                raise MirrorConfigError(f"{path}: no such file")
            continue
        files.append(parse_registries_conf(data, str(path)))
    for d in where.conf_dirs:
        try:
            names = sorted(p for p in d.iterdir() if p.name.endswith(".conf"))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise MirrorConfigError(f"{d}: {e.strerror}") from None
        for p in names:
            data = read_file(p)
            if data is not None:
                files.append(parse_registries_conf(data, str(p)))
    return MirrorConfig(merge_registries(files), where.hosts_dir, read_file)
