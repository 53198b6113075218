"""Standalone containers (`lazyshim run`): their record, their owner, and their teardown.

    STORE/containers/<id>/
        container.json   what was run (image, command, name, --rm, delegate root, state dir)
        exit             the exit code, once the run has ended
        ctr.log          the container's stdout and stderr (detached runs)
        upper/ work/ rootfs/ bundle/   the overlay and the bundle handed to the delegate
    RUNTIME_DIR/<id>/owner             the container dir that owns this state dir

Ownership is an exclusive flock(2) on the container directory, held by the process that
watches the container (the foreground `lazyshim run`, or the monitor of a detached one)
for as long as it lives.  The directory is made under a temporary name, locked, and only
then renamed into place, so no reader ever sees an unowned container that is merely
young.  A killed owner's lock goes with it: whoever next takes the lock knows the
container is stale and tears it down (`runtime.stale`).  Readers (`ps`) probe with a
shared lock, so two of them never mistake each other for an owner.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shim.errors import LazyshimError

from . import paths

RECORD = "container.json"
EXIT = "exit"
LOG = "ctr.log"
OWNER = "owner"
CLAIM_PREFIX = "~new."  # "~" is never part of a container id
SUBDIRS = ("upper", "work", "rootfs", "bundle")


@dataclass
class Record:
    id: str
    image: str
    image_id: str
    command: list[str]
    created: float
    rm: bool
    delegate: str
    delegate_root: str
    state_dir: str
    name: str = ""
    detach: bool = False
    log: str = ""
    network: str = "none"
    extra: dict = field(default_factory=dict)


class Owned:
    """A container directory this process owns (its flock held) until `release`."""

    def __init__(self, cdir: Path, fd: int, record: Record) -> None:
        self.cdir = cdir
        self.fd = fd
        self.record = record

    def save(self) -> None:
        _write_atomic(self.cdir / RECORD, json.dumps(asdict(self.record), indent=1).encode())

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def create(containers: Path, record: Record) -> Owned:
    """Make and own STORE/containers/<id>: locked before it appears under its name."""
    if not paths.valid_id(record.id) or record.id in paths.RESERVED:
        raise LazyshimError(f"invalid container name {record.id!r}")
    containers.mkdir(parents=True, exist_ok=True, mode=0o711)
    final = containers / record.id
    if final.exists():
        raise LazyshimError(f"container {record.id!r} already exists")
    tmp = containers / f"{CLAIM_PREFIX}{os.getpid()}.{record.id}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o755)
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)
    owned = Owned(tmp, fd, record)
    try:
        for sub in SUBDIRS:
            (tmp / sub).mkdir(mode=0o755)
        owned.save()
        try:
            os.rename(tmp, final)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise LazyshimError(f"container {record.id!r} already exists") from e
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        owned.release()
        raise
    owned.cdir = final
    return owned


def claim_state_dir(owned: Owned) -> Path:
    """The container's state dir under the runtime dir, marked with its owner."""
    sdir = Path(owned.record.state_dir)
    sdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    (sdir / OWNER).write_text(str(owned.cdir))
    return sdir


def load(cdir: Path) -> Record | None:
    try:
        doc = json.loads((cdir / RECORD).read_bytes())
        return Record(**doc) if isinstance(doc, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def exit_code(cdir: Path) -> int | None:
    try:
        return int((cdir / EXIT).read_text())
    except (OSError, ValueError):
        return None


def try_own(cdir: Path) -> int | None:
    """The container dir's lock, taken without waiting: a fd if nobody owns it, else None."""
    try:
        fd = os.open(cdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    if not cdir.is_dir():  # removed between open and lock
        os.close(fd)
        return None
    return fd


def is_owned(cdir: Path) -> bool:
    """True while a live process watches the container (it holds the lock)."""
    try:
        fd = os.open(cdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def list_dirs(containers: Path) -> list[Path]:
    """Standalone container dirs (not the runc path's `oci/` scratch, not half-made claims)."""
    try:
        names = sorted(os.listdir(containers))
    except OSError:
        return []
    return [containers / n for n in names if paths.valid_id(n) and n not in paths.RESERVED]


def delegate_has(record: Record) -> bool:
    """runc and crun keep one directory per container under their --root."""
    return os.path.lexists(os.path.join(record.delegate_root, record.id))


def delegate(record: Record, *args: str) -> int:
    """Run the container's delegate quietly (teardown must not add to the user's output)."""
    return subprocess.call([record.delegate, "--root", record.delegate_root, *args],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def teardown(cdir: Path, record: Record, code: int | None, remove: bool) -> None:
    """Leave nothing running or mounted: the delegate's container, the supervisor, the
    network, the overlay; then the container dir itself (`--rm`) or its exit code.  Safe to
    run again on what a previous, interrupted teardown left."""
    from . import attach, overlay

    if delegate_has(record):
        delegate(record, "delete", "--force", record.id)
    attach.stop_supervisor(record.id, sdir=Path(record.state_dir))
    if record.network == "bridge":
        from . import network

        try:
            network.release(record.id)
        except Exception:  # noqa: BLE001 - a missing veth is already released
            pass
    rootfs = cdir / "rootfs"
    overlay.unmount(rootfs)
    from . import bigmount

    bigmount.stop(cdir)  # the FUSE layer of big files, once the overlay on it is gone
    if remove:
        if os.path.ismount(rootfs):
            raise LazyshimError(f"{rootfs} is still mounted; not removing the container")
        shutil.rmtree(cdir, ignore_errors=True)
    elif exit_code(cdir) is None:
        _write_atomic(cdir / EXIT, str(137 if code is None else code).encode())


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.rename(tmp, path)

