"""Learned start-up profiles: the files a workload needed, in first-need order.

    STORE/profiles/<repository key>/<command key>/<alg>-<hex>.json

One profile per repository (registry/name), command (entrypoint+cmd and working dir) and image
(manifest digest).  A run of an image records what it opened; the next cold start of that
image, or of another image of the same repository run with the same command (a later tag),
prefetches the recorded files whose path and content digest it still holds, in large requests,
before the workload asks.  A profile only says what to fetch early: every byte is still
verified against the image's TOC, so a wrong or hostile profile costs bandwidth, never data.

Profiles outlive their images (`rmi`, `gc`): they hold no image bytes, are small and bounded,
and are what makes the next pull of the image, or of its next tag, start warm.  Each
repository and command keeps its `PER_COMMAND` newest, the store its `MAX_PROFILES` newest;
`lazyshim profile rm` removes them.

Big files served chunk by chunk (`shim.bigfs`) are recorded apart, in `chunks`: per big file
(first touch first) the indices of the chunks the run touched, in first-touch order, so that
the next cold start fetches those chunks, not the whole file.  At most `MAX_CHUNK_FILES` files
and `MAX_CHUNKS` indices; an index must lie inside the file (below its size and the bound).

Every profile file is read as hostile: one bigger than `MAX_BYTES`, with more than
`MAX_FILES` entries, or of the wrong shape is ignored (one log line) or refused by `import`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LazyshimError
from .layout import Store, digest_dirname

DIR = "profiles"
VERSION = 1
#: A profile lists at most this many files (a start-up set, not an image).
MAX_FILES = 16384
#: Big files with touched chunks a profile lists at most, and chunk indices in all of them.
MAX_CHUNK_FILES = 256
MAX_CHUNKS = 65536
#: A profile file larger than this is not read.
MAX_BYTES = 4 << 20
MAX_NAME = 4096
MAX_ARGS = 256
#: `lazyshim profile import` takes at most this many profiles at once.
MAX_IMPORT = 64
MAX_IMPORT_BYTES = 32 << 20
#: Profiles kept per repository and command (the newest images), and in the whole store.
PER_COMMAND = 4
MAX_PROFILES = 256
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_KEY = re.compile(r"^[0-9a-f]{16}$")


@dataclass
class Profile:
    """What one image needed when run with one command.

    `files`: (TOC name, content digest or "", size), first need first; the name is relative
    to the image root, as in the TOC.  `chunks`: (TOC name, digest or "", size, chunk indices)
    of the big files a FUSE layer served, first touch first (`shim.bigfs`)."""

    image: str
    registry: str
    repository: str
    args: list[str]
    cwd: str
    files: list[tuple[str, str, int]] = field(default_factory=list)
    updated: float = 0.0
    chunks: list[tuple[str, str, int, list[int]]] = field(default_factory=list)

    @property
    def command_key(self) -> str:
        return command_key(self.args, self.cwd)

    @property
    def total_size(self) -> int:
        return sum(size for _, _, size in self.files)


def enabled(value: str | None) -> bool:
    """`profiles` in the configuration: on (the default) or off."""
    if value in (None, "", "on"):
        return True
    if value == "off":
        return False
    raise LazyshimError(f"profiles = {value!r}: expected on or off")


def command_key(args: Sequence[str], cwd: str) -> str:
    """What identifies a workload across runs and tags: its argv and working directory."""
    return hashlib.sha256(json.dumps([list(args), cwd]).encode()).hexdigest()[:16]


def repository_key(registry: str, repository: str) -> str:
    return hashlib.sha256(f"{registry}/{repository}".encode()).hexdigest()[:16]


def root(store: Store) -> Path:
    return store.root / DIR


def path_of(store: Store, p: Profile) -> Path:
    return root(store) / repository_key(p.registry, p.repository) / p.command_key / (digest_dirname(p.image) + ".json")


# ---- the file format ---------------------------------------------------------------------
def dump(p: Profile) -> bytes:
    doc = {
        "v": VERSION, "image": p.image, "registry": p.registry, "repository": p.repository,
        "command": {"args": p.args, "cwd": p.cwd}, "updated": p.updated,
        "files": [list(f) for f in p.files],
    }
    if p.chunks:  # absent, not empty, where no big file was touched: as profiles were before
        doc["chunks"] = [[name, digest, size, list(ks)] for name, digest, size, ks in p.chunks]
    return json.dumps(doc, separators=(",", ":")).encode()


def parse(data: bytes) -> Profile:
    """A profile from its bytes, every field checked; LazyshimError (one line) otherwise."""
    return parse_doc(_json(data, MAX_BYTES))


def parse_many(data: bytes) -> list[Profile]:
    """What `lazyshim profile export` wrote: a list of profiles (or one)."""
    d = _json(data, MAX_IMPORT_BYTES)
    docs = d if isinstance(d, list) else [d]
    if len(docs) > MAX_IMPORT:
        raise LazyshimError(f"more than {MAX_IMPORT} profiles")
    return [parse_doc(x) for x in docs]


def to_doc(p: Profile) -> dict:
    return json.loads(dump(p))


def _json(data: bytes, limit: int):
    if len(data) > limit:
        raise LazyshimError(f"profile larger than {limit} bytes")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: a few MB of `[` fit under the bound
        raise LazyshimError(f"profile is not JSON: {str(e)[:80]}") from None


def parse_doc(d) -> Profile:
    """A profile from its decoded JSON document, every field checked."""
    if not isinstance(d, dict) or d.get("v") != VERSION:
        raise LazyshimError(f"profile version {d.get('v') if isinstance(d, dict) else None!r} is not supported")
    image, registry, repository = d.get("image"), d.get("registry"), d.get("repository")
    if not isinstance(image, str) or not _DIGEST.match(image):
        raise LazyshimError("profile: image is not a sha256 digest")
    if not (_short_str(registry) and _short_str(repository)):
        raise LazyshimError("profile: registry and repository must be short strings")
    cmd = d.get("command")
    args = cmd.get("args") if isinstance(cmd, dict) else None
    cwd = cmd.get("cwd") if isinstance(cmd, dict) else None
    if not (isinstance(args, list) and len(args) <= MAX_ARGS and all(_short_str(a) for a in args)
            and _short_str(cwd)):
        raise LazyshimError("profile: command must hold args (strings) and cwd")
    updated = d.get("updated", 0.0)
    if not isinstance(updated, int | float) or isinstance(updated, bool):
        raise LazyshimError("profile: updated is not a number")
    files = d.get("files")
    if not isinstance(files, list) or len(files) > MAX_FILES:
        raise LazyshimError(f"profile: files must be a list of at most {MAX_FILES}")
    out: list[tuple[str, str, int]] = []
    for f in files:
        if not (isinstance(f, list) and len(f) == 3):
            raise LazyshimError("profile: a file is not [name, digest, size]")
        name, digest, size = f
        if not _valid_name(name):
            raise LazyshimError(f"profile: bad file name {str(name)[:80]!r}")
        if not isinstance(digest, str) or (digest and not _DIGEST.match(digest)):
            raise LazyshimError(f"profile: bad digest for {name[:80]!r}")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 1 << 62:
            raise LazyshimError(f"profile: bad size for {name[:80]!r}")
        out.append((name, digest, size))
    return Profile(image, registry, repository, list(args), cwd, out, float(updated), _chunks(d.get("chunks", [])))


def _chunks(doc) -> list[tuple[str, str, int, list[int]]]:
    """The `chunks` field checked: bounded counts, each index a distinct int inside its file."""
    if not isinstance(doc, list) or len(doc) > MAX_CHUNK_FILES:
        raise LazyshimError(f"profile: chunks must be a list of at most {MAX_CHUNK_FILES} files")
    out: list[tuple[str, str, int, list[int]]] = []
    total = 0
    for f in doc:
        if not (isinstance(f, list) and len(f) == 4):
            raise LazyshimError("profile: a big file is not [name, digest, size, chunks]")
        name, digest, size, ks = f
        if not _valid_name(name):
            raise LazyshimError(f"profile: bad big file name {str(name)[:80]!r}")
        if not isinstance(digest, str) or (digest and not _DIGEST.match(digest)):
            raise LazyshimError(f"profile: bad digest for {name[:80]!r}")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size < 1 << 62:
            raise LazyshimError(f"profile: bad size for {name[:80]!r}")
        if not isinstance(ks, list) or not ks:
            raise LazyshimError(f"profile: chunks of {name[:80]!r} must be a non-empty list")
        total += len(ks)
        if total > MAX_CHUNKS:
            raise LazyshimError(f"profile: more than {MAX_CHUNKS} chunks")
        if not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < min(size, MAX_CHUNKS) for k in ks):
            raise LazyshimError(f"profile: a chunk index of {name[:80]!r} is out of range")
        if len(set(ks)) != len(ks):
            raise LazyshimError(f"profile: a chunk of {name[:80]!r} is listed twice")
        out.append((name, digest, size, list(ks)))
    return out


def _short_str(v) -> bool:
    return isinstance(v, str) and len(v) <= MAX_NAME and "\0" not in v


def _valid_name(name) -> bool:
    """A TOC name as the formats normalise it: relative, no empty, `.` or `..` component."""
    if not _short_str(name) or not name or name.startswith("/") or name.endswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


# ---- the store ---------------------------------------------------------------------------
def save(store: Store, p: Profile) -> Path:
    """Write `p` atomically (readers see the old or the new one), then drop the oldest profiles
    beyond the bounds."""
    if not p.updated:
        p.updated = time.time()
    path = path_of(store, p)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write(path, dump(p))
    _prune(sorted(_files(path.parent.parent, path.parent.name), key=_mtime, reverse=True)[PER_COMMAND:])
    everything = sorted(_files(root(store)), key=_mtime, reverse=True)
    _prune(everything[MAX_PROFILES:])
    return path


def _write(path: Path, data: bytes) -> None:
    """Replace the file at once, without an fsync: a crash may cost the profile (an empty or
    unreadable file is ignored), never a run's time at its end."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def load(path: Path, log: Callable[[str], None] | None = None) -> Profile | None:
    """The profile at `path`, or None (with one log line) if it cannot be read or is not one."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
        return parse(data)
    except FileNotFoundError:
        return None
    except (OSError, LazyshimError) as e:
        if log is not None:
            log(f"profile {path} ignored: {e}")
        return None


def find(store: Store, image: str, registry: str, repository: str, args: Sequence[str], cwd: str,
         log: Callable[[str], None] | None = None) -> Profile | None:
    """The profile of this image and command, else the newest of another image of the same
    repository with the same command (a later or earlier tag), else None."""
    cmd = command_key(args, cwd)
    folder = root(store) / repository_key(registry, repository) / cmd
    exact = folder / (digest_dirname(image) + ".json")
    p = load(exact, log)
    if p is not None and _is(p, image, registry, repository, cmd):
        return p
    for other in sorted(_files(folder.parent, cmd), key=_mtime, reverse=True):
        if other == exact:
            continue
        p = load(other, log)
        if p is not None and p.registry == registry and p.repository == repository and p.command_key == cmd:
            return p
    return None


def _is(p: Profile, image: str, registry: str, repository: str, cmd: str) -> bool:
    return p.image == image and p.registry == registry and p.repository == repository and p.command_key == cmd


def listing(store: Store, log: Callable[[str], None] | None = None) -> list[tuple[Path, Profile]]:
    """Every readable profile of the store, newest first."""
    out = []
    for path in sorted(_files(root(store)), key=_mtime, reverse=True):
        p = load(path, log)
        if p is not None:
            out.append((path, p))
    return out


def of_removed_images(store: Store) -> int:
    """How many profiles belong to images the store no longer holds (kept: see the module doc)."""
    return sum(1 for path in _files(root(store)) if not (store.images / (path.stem + ".cbor")).exists())


KEPT_NOTE = ("kept {n} start-up profile(s) of removed images: the next pull of one, or of another tag of its "
             "repository, starts warm (lazyshim profile rm REF deletes them)")


def remove(store: Store, paths: Iterable[Path]) -> int:
    """Delete these profile files (and folders left empty); returns how many went."""
    return _prune(list(paths))


def _files(base: Path, command: str | None = None) -> list[Path]:
    """Profile files under `base` (the store's profiles dir, or with `command` one repository's)."""
    pattern = f"{command}/*.json" if command else "*/*/*.json"
    if command is not None:
        return [p for p in base.glob(pattern) if p.is_file()]
    return [p for p in base.glob(pattern) if p.is_file() and _KEY.match(p.parent.name)]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _prune(paths: list[Path]) -> int:
    n = 0
    for path in paths:
        try:
            path.unlink()
            n += 1
        except FileNotFoundError:
            continue
        for d in (path.parent, path.parent.parent):
            try:
                d.rmdir()
            except OSError:
                break
    return n


# ---- matching an image -------------------------------------------------------------------
def match(files: Sequence[tuple[str, str, int]], layers_top_first: Sequence[Sequence]) -> list[tuple[int, int]]:
    """Which entries of an image the profile's files are: (layer position in
    `layers_top_first`, entry index), in profile order.

    A file counts where the image shows it: the topmost layer holding the name (or a whiteout
    of it) decides.  It matches if that entry is a regular file of the same size and the same
    content digest; a profile file without a digest matches, by name and size only (it was
    recorded from an image whose TOC gave no whole-file digest) an entry without one."""
    wanted: dict[str, tuple[int, str, int]] = {}
    for pos, (name, digest, size) in enumerate(files):
        wanted.setdefault(name, (pos, digest, size))
    whiteouts = {_whiteout(name): name for name in wanted}
    decided: set[str] = set()
    found: list[tuple[int, int, int]] = []  # (profile position, layer, entry)
    for layer, entries in enumerate(layers_top_first):
        if len(decided) == len(wanted):
            break
        for i, e in enumerate(entries):
            name = e.name
            if name in wanted:
                if name in decided:
                    continue
                decided.add(name)
                pos, digest, size = wanted[name]
                if e.type == "reg" and e.size == size and size and (digest == (e.digest or "")):
                    found.append((pos, layer, i))
            elif name in whiteouts:
                decided.add(whiteouts[name])
    found.sort()
    return [(layer, i) for _, layer, i in found]


def _whiteout(name: str) -> str:
    head, _, base = name.rpartition("/")
    return f"{head}/.wh.{base}" if head else f".wh.{base}"


def image_of_layers(store: Store, layers: Sequence[str]) -> str | None:
    """The id of the one image record made of exactly `layers`, or None (none, or several)."""
    from .metadata import load_image

    hits = set()
    want = list(layers)
    for f in store.images.glob("*.cbor"):
        try:
            rec = load_image(f.read_bytes())
        except (OSError, LazyshimError):
            continue
        if rec.layers == want:
            hits.add(rec.id)
    return hits.pop() if len(hits) == 1 else None


def merge_chunks(new: list[tuple[str, str, int, list[int]]], seen: set[tuple[str, str, int]],
                 old: Profile | None, cut_short: bool) -> list[tuple[str, str, int, list[int]]]:
    """The big files' chunks a run writes: what it touched; then the earlier profile's entries
    of big files it could not see (no FUSE layer served them: complete, read natively), or of
    any file when it was cut short.  `seen`: (name, digest, size) of the big files it served."""
    out, total = [], 0
    for name, digest, size, ks in new[:MAX_CHUNK_FILES]:
        ks = ks[:MAX_CHUNKS - total]
        if ks:
            out.append((name, digest, size, ks))
            total += len(ks)
    if old is not None:
        have = {(name, digest, size) for name, digest, size, _ in out}
        for name, digest, size, ks in old.chunks:
            key = (name, digest, size)
            if key in have or (key in seen and not cut_short) or len(out) >= MAX_CHUNK_FILES:
                continue
            ks = ks[:MAX_CHUNKS - total]
            if ks:
                out.append((name, digest, size, ks))
                total += len(ks)
    return out


def keep_or_merge(new: list[tuple[str, str, int]], old: Profile | None, cut_short: bool) -> list[tuple[str, str, int]]:
    """What a run writes: what it needed, first need first; when it could not see all of its
    needs (the image became complete, or the bound was hit), the earlier profile's other files
    after them."""
    out = list(new[:MAX_FILES])
    if cut_short and old is not None:
        seen = {name for name, _, _ in out}
        out += [f for f in old.files if f[0] not in seen][:MAX_FILES - len(out)]
    return out


