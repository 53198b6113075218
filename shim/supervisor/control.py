"""The supervisor's control sockets: `STATE/control.sock` (answered with one JSON document of
statistics) and `STATE/finish.sock` (answered with "done" once what must outlive the supervisor,
its learned profile, is written, after which it writes nothing more into the state dir: the runtime
asks before it stops a supervisor and deletes the dir).

sun_path holds 107 bytes, and a state dir keyed by a containerd --root and a 64-hex CRI
container id is longer than that (`/run/lazyshim/oci/%2Frun%2Fcontainerd%2Frunc%2Fk8s.io/<id>`).
Both ends therefore reach the socket through an O_PATH fd of its dir (`/proc/self/fd/N/NAME`),
which keeps it in the state dir whatever the dir's length.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

NAME = "control.sock"
FINISH = "finish.sock"


def _via_dir_fd(path: Path, op) -> None:
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        op(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)


def bind(path: Path, backlog: int = 4) -> socket.socket:
    """A listening socket at `path` (an old one there is replaced)."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _via_dir_fd(path, sock.bind)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def connect(path: Path, timeout: float) -> socket.socket:
    """A connection to the socket at `path`; FileNotFoundError if no one ever bound it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        _via_dir_fd(path, sock.connect)
    except BaseException:
        sock.close()
        raise
    return sock


def finish(state_dir: Path, timeout: float) -> None:
    """Ask the supervisor of `state_dir` to write what it must before it is stopped, and wait
    for its answer (at most `timeout`); nothing if none is listening."""
    try:
        sock = connect(state_dir / FINISH, timeout)
    except OSError:
        return
    try:
        sock.recv(16)
    except OSError:
        pass
    finally:
        sock.close()
