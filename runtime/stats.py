"""`lazyshim stats ID`: what a container's supervisor has done (opens, fills, bytes, latency)."""

from __future__ import annotations

import json
import socket
import sys

from shim.errors import LazyshimError

from .attach import state_dir


def stats(container_id: str, timeout: float = 5.0) -> dict:
    sdir = state_dir(container_id)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(sdir / "control.sock"))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    except FileNotFoundError as e:
        raise LazyshimError(f"container {container_id!r} does not exist or has no supervisor") from e
    except OSError as e:
        raise LazyshimError(f"container {container_id!r}: supervisor did not answer ({e})") from e
    finally:
        sock.close()
    try:
        return json.loads(data)
    except ValueError as e:
        raise LazyshimError(f"container {container_id!r}: bad answer from its supervisor") from e


def cmd_stats(args) -> int:
    json.dump(stats(args.container_id), sys.stdout, indent=2)
    print()
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("stats", help="show a lazy container's fill statistics")
    p.add_argument("--format", choices=("json",), default="json", help="always JSON (accepted for podman users)")
    p.add_argument("container_id")
    p.set_defaults(func=cmd_stats)
