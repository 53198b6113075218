"""Receive seccomp notify fds from runc/crun over the `listenerPath` socket.

The runtime connects to the socket and sends one message: the container state JSON as
data and the notify fd via SCM_RIGHTS (runc at `create`, crun at `start`, `exec` again).
"""

from __future__ import annotations

import array
import json
import os
import socket

MAX_STATE = 1 << 20


def receive_fd(conn: socket.socket) -> tuple[int | None, dict]:
    """Read the state message and its fd from one connection; (None, {}) if none came.

    Reads until the fd and a complete JSON document have arrived (runc does not close the
    connection before the container's first trapped syscall); callers run this per
    connection in its own thread so a sender that stalls blocks only itself.
    """
    fds = array.array("i")
    data = b""
    while len(data) < MAX_STATE:
        msg, ancdata, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(16 * fds.itemsize))
        for level, typ, payload in ancdata:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
        if not msg:
            break
        data += msg
        if fds and _complete_json(data):
            break  # runc keeps the connection open while its init blocks in the trapped exec
    state: dict = {}
    try:
        state = json.loads(data) if data else {}
    except ValueError:
        state = {}
    for extra in fds[1:]:
        os.close(extra)
    return (fds[0] if fds else None), state


def _complete_json(data: bytes) -> bool:
    try:
        json.loads(data)
        return True
    except ValueError:
        return False
