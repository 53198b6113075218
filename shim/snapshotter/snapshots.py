"""Snapshot bookkeeping with the semantics of containerd's overlayfs snapshotter.

    ROOT/state.json              every snapshot: key -> id, kind, parent, labels, times, layer
    ROOT/snapshots/<id>/{fs,work}  the upper (and work) dir of a snapshot we hold the files of
    ROOT/lock                    held by the one process serving ROOT

A snapshot is active (a writable dir), a view (read-only) or committed (an immutable layer
that children stack on).  A committed snapshot may be *lazy*: its files are a layer tree in
the lazyshim store (named by `layer`, found through `lowerdir`), so it has no dir here.
State is rewritten atomically after every change, so a restart keeps every snapshot and a
crash never leaves one half-recorded; dirs without a record are removed by `cleanup`.
This module is pure bookkeeping and file layout: no gRPC, no registry.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import LazyshimError

VIEW, ACTIVE, COMMITTED = "view", "active", "committed"
MAX_KEY = 4096
MAX_LABELS_BYTES = 64 << 10


class SnapshotError(LazyshimError):
    """A request that cannot be honoured; `code` is the containerd errdefs class."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code  # "not_found", "already_exists", "failed_precondition", "invalid_argument"


def _not_found(key: str) -> SnapshotError:
    return SnapshotError("not_found", f"snapshot {key!r} does not exist")


@dataclass
class Snapshot:
    id: str
    kind: str
    parent: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0
    layer: str = ""  # a lazy committed snapshot: the store's layer digest
    size: int = 0    # committed: bytes and inodes of its dir, measured at commit
    inodes: int = 0


@dataclass(frozen=True)
class Mount:
    type: str
    source: str
    options: tuple[str, ...]


class Snapshots:
    """All snapshots under one root.  Thread-safe: the gRPC server calls from a pool."""

    def __init__(self, root: Path, lowerdir: Callable[[str], Path]) -> None:
        self.root = Path(root)
        self._lowerdir = lowerdir
        self._mu = threading.RLock()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        (self.root / "snapshots").mkdir(exist_ok=True, mode=0o700)
        self._lock_fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise LazyshimError(f"snapshotter root {self.root} is in use by another process") from None
        try:
            self._next, self._snaps = self._load()
        except BaseException:
            os.close(self._lock_fd)
            raise

    def close(self) -> None:
        os.close(self._lock_fd)

    # ------------------------------------------------------------------ state file

    @property
    def _state_file(self) -> Path:
        return self.root / "state.json"

    def _load(self) -> tuple[int, dict[str, Snapshot]]:
        try:
            doc = json.loads(self._state_file.read_bytes())
        except FileNotFoundError:
            return 1, {}
        except (OSError, ValueError) as e:
            raise LazyshimError(f"snapshotter state {self._state_file} is unreadable: {e}") from e
        try:
            snaps = {k: Snapshot(**v) for k, v in doc["snapshots"].items()}
            bad = next((s.id for s in snaps.values() if not (isinstance(s.id, str) and s.id.isdigit())), None)
            if bad is not None:  # ids name dirs that are deleted: never a path
                raise ValueError(f"snapshot id {str(bad)[:40]!r}")
            return int(doc["next"]), snaps
        except (KeyError, TypeError, ValueError) as e:
            raise LazyshimError(f"snapshotter state {self._state_file} is damaged: {e}") from e

    def _save(self) -> None:
        doc = {"next": self._next, "snapshots": {k: asdict(s) for k, s in self._snaps.items()}}
        tmp = self._state_file.with_name(f".state.json.{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(json.dumps(doc, sort_keys=True).encode())
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, self._state_file)

    def _dir(self, snap: Snapshot) -> Path:
        return self.root / "snapshots" / snap.id

    # ------------------------------------------------------------------ queries

    def get(self, key: str) -> Snapshot:
        with self._mu:
            snap = self._snaps.get(key)
            if snap is None:
                raise _not_found(key)
            return snap

    def exists(self, key: str) -> bool:
        with self._mu:
            return key in self._snaps

    def walk(self) -> Iterator[tuple[str, Snapshot]]:
        with self._mu:
            items = list(self._snaps.items())
        yield from items

    def layers_in_use(self) -> set[str]:
        with self._mu:
            return {s.layer for s in self._snaps.values() if s.layer}

    def usage(self, key: str) -> tuple[int, int]:
        snap = self.get(key)
        if snap.kind == COMMITTED:
            return snap.size, snap.inodes
        return _disk_usage(self._dir(snap) / "fs")

    def mounts(self, key: str) -> list[Mount]:
        """What to mount for `key`, as containerd's overlayfs snapshotter answers."""
        with self._mu:
            snap = self.get(key)
            lowers = [self._lower(p) for p in self._ancestors(snap)]
        if snap.kind == ACTIVE and not lowers:
            return [Mount("bind", str(self._dir(snap) / "fs"), ("rw", "rbind"))]
        if snap.kind == ACTIVE:
            d = self._dir(snap)
            return [Mount("overlay", "overlay", ("index=off", f"workdir={d / 'work'}", f"upperdir={d / 'fs'}",
                                                 "lowerdir=" + ":".join(str(low) for low in lowers)))]
        if snap.kind == COMMITTED:
            lowers = [self._lower(snap), *lowers]
        if not lowers:
            return [Mount("bind", str(self._dir(snap) / "fs"), ("ro", "rbind"))]
        if len(lowers) == 1:
            return [Mount("bind", str(lowers[0]), ("ro", "rbind"))]
        return [Mount("overlay", "overlay", ("lowerdir=" + ":".join(str(low) for low in lowers),))]

    def lazy_layers_below(self, key: str) -> list[str]:
        """Layer digests of the lazy snapshots `key` stacks on (bottom first)."""
        with self._mu:
            snap = self.get(key)
            chain = self._ancestors(snap)
            if snap.kind == COMMITTED:
                chain.insert(0, snap)
        return [s.layer for s in reversed(chain) if s.layer]

    def _ancestors(self, snap: Snapshot) -> list[Snapshot]:
        """Parents, nearest first."""
        out: list[Snapshot] = []
        key = snap.parent
        while key:
            parent = self._snaps.get(key)
            if parent is None or len(out) > len(self._snaps):
                raise SnapshotError("failed_precondition", f"parent {key!r} of a snapshot is missing")
            out.append(parent)
            key = parent.parent
        return out

    def _lower(self, snap: Snapshot) -> Path:
        return self._lowerdir(snap.layer) if snap.layer else self._dir(snap) / "fs"

    # ------------------------------------------------------------------ changes

    def create(self, kind: str, key: str, parent: str, labels: dict[str, str]) -> list[Mount]:
        """Prepare (kind ACTIVE) or View (kind VIEW) `key` on `parent`."""
        _check_key(key)
        _check_labels(labels)
        with self._mu:
            if key in self._snaps:
                raise SnapshotError("already_exists", f"snapshot {key!r} already exists")
            if parent:
                p = self._snaps.get(parent)
                if p is None:
                    raise SnapshotError("not_found", f"parent snapshot {parent!r} does not exist")
                if p.kind != COMMITTED:
                    raise SnapshotError("invalid_argument", f"parent {parent!r} is not a committed snapshot")
            now = time.time()
            snap = Snapshot(id=str(self._next), kind=kind, parent=parent, labels=dict(labels), created=now,
                            updated=now)
            d = self._dir(snap)
            shutil.rmtree(d, ignore_errors=True)  # a leftover of a crash before the state was written
            (d / "fs").mkdir(parents=True, mode=0o755)
            if kind == ACTIVE and parent:
                (d / "work").mkdir(mode=0o711)
            self._next += 1
            self._snaps[key] = snap
            self._save()
        return self.mounts(key)

    def add_lazy(self, name: str, parent: str, labels: dict[str, str], layer: str) -> None:
        """Record a committed snapshot whose files are the store's layer `layer`."""
        _check_key(name)
        _check_labels(labels)
        with self._mu:
            if name in self._snaps:
                raise SnapshotError("already_exists", f"snapshot {name!r} already exists")
            if parent and parent not in self._snaps:
                raise SnapshotError("not_found", f"parent snapshot {parent!r} does not exist")
            if parent and self._snaps[parent].kind != COMMITTED:
                raise SnapshotError("invalid_argument", f"parent {parent!r} is not a committed snapshot")
            now = time.time()
            self._snaps[name] = Snapshot(id=str(self._next), kind=COMMITTED, parent=parent, labels=dict(labels),
                                         created=now, updated=now, layer=layer)
            self._next += 1
            self._save()

    def commit(self, name: str, key: str, labels: dict[str, str]) -> None:
        _check_key(name)
        _check_labels(labels)
        with self._mu:
            snap = self.get(key)
            if snap.kind != ACTIVE:
                raise SnapshotError("failed_precondition", f"snapshot {key!r} is not active")
            if name in self._snaps:
                raise SnapshotError("already_exists", f"snapshot {name!r} already exists")
        size, inodes = _disk_usage(self._dir(snap) / "fs")  # outside the lock: it walks the tree
        with self._mu:
            if self._snaps.get(key) is not snap or name in self._snaps:
                raise SnapshotError("failed_precondition", f"snapshot {key!r} changed during commit")
            now = time.time()
            del self._snaps[key]
            self._snaps[name] = Snapshot(id=snap.id, kind=COMMITTED, parent=snap.parent, labels=dict(labels),
                                         created=now, updated=now, size=size, inodes=inodes)
            self._save()
        shutil.rmtree(self._dir(snap) / "work", ignore_errors=True)

    def remove(self, key: str) -> None:
        with self._mu:
            snap = self.get(key)
            child = next((k for k, s in self._snaps.items() if s.parent == key), None)
            if child is not None:
                raise SnapshotError("failed_precondition", f"snapshot {key!r} has a child {child!r}")
            del self._snaps[key]
            self._save()
        if not snap.layer:
            _remove_tree(self._dir(snap))

    def update_labels(self, key: str, labels: dict[str, str], paths: list[str]) -> Snapshot:
        """Update labels as containerd does: no paths replaces them all; `labels` too;
        `labels.K` sets (or, absent from `labels`, removes) one."""
        with self._mu:
            snap = self.get(key)
            new = dict(snap.labels)
            if not paths:
                new = dict(labels)
            for path in paths:
                if path == "labels":
                    new = dict(labels)
                elif path.startswith("labels."):
                    k = path[len("labels."):]
                    if k in labels:
                        new[k] = labels[k]
                    else:
                        new.pop(k, None)
                else:
                    raise SnapshotError("invalid_argument", f"cannot update field {path!r} of a snapshot")
            _check_labels(new)
            snap.labels = new
            snap.updated = time.time()
            self._save()
            return snap

    def cleanup(self) -> list[str]:
        """Remove snapshot dirs that no record names (left by a crash or a remove); returns them."""
        with self._mu:
            ids = {s.id for s in self._snaps.values()}
        removed = []
        for d in sorted((self.root / "snapshots").iterdir()):
            if d.name not in ids:
                _remove_tree(d)
                removed.append(d.name)
        return removed


def _check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY or "\x00" in key:
        raise SnapshotError("invalid_argument", f"invalid snapshot key {key[:80]!r}")


def _check_labels(labels: dict[str, str]) -> None:
    if sum(len(k) + len(v) for k, v in labels.items()) > MAX_LABELS_BYTES:
        raise SnapshotError("invalid_argument", "snapshot labels are too large")


def _remove_tree(d: Path) -> None:
    """Delete a snapshot dir (containerd removes a snapshot only once nothing mounts it)."""
    shutil.rmtree(d, ignore_errors=True)


def _disk_usage(d: Path) -> tuple[int, int]:
    size = inodes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(d):
        for name in dirnames + filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            inodes += 1
            size += st.st_blocks * 512
    return size, inodes
