"""`lazyshim stats ID`: what a container's supervisor has done (opens, fills, bytes, latency).

A container started by `lazyshim run` has its state in RUNTIME_DIR/ID; one created through
the OCI command line (containerd, podman, CRI) in RUNTIME_DIR/oci/<its --root>/ID.  Without
`--root` every root is searched, so `lazyshim stats ID` works for the id a kubelet or ctr shows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from shim.errors import LazyshimError

from . import paths
from .attach import runtime_dir, state_dir


def find_state_dir(container_id: str, root: str | None = None) -> Path:
    """The state dir of `container_id`: under `root` if given, else wherever it is unique."""
    own = state_dir(container_id)  # also checks the id: it becomes a path component
    if root is not None:
        return Path(paths.oci_state_dir(root, container_id))
    if own.is_dir():
        return own
    found = sorted((runtime_dir() / "oci").glob(f"*/{container_id}"))
    found = [d for d in found if d.is_dir()]
    if len(found) > 1:
        roots = ", ".join(d.parent.name.replace("%2F", "/").replace("%25", "%") for d in found)
        raise LazyshimError(f"container {container_id!r} exists under several roots ({roots}): pass --root")
    return found[0] if found else own


def stats(container_id: str, timeout: float = 5.0, root: str | None = None) -> dict:
    from shim.supervisor import control

    sdir = find_state_dir(container_id, root)
    try:
        sock = control.connect(sdir / control.NAME, timeout)
    except FileNotFoundError as e:
        raise LazyshimError(f"container {container_id!r} does not exist or has no supervisor") from e
    except OSError as e:
        raise LazyshimError(f"container {container_id!r}: supervisor did not answer ({e})") from e
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError as e:
        raise LazyshimError(f"container {container_id!r}: supervisor did not answer ({e})") from e
    finally:
        sock.close()
    try:
        return json.loads(data)
    except ValueError as e:
        raise LazyshimError(f"container {container_id!r}: bad answer from its supervisor") from e


def cmd_stats(args) -> int:
    json.dump(stats(args.container_id, root=args.root), sys.stdout, indent=2)
    print()
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("stats", help="show a lazy container's fill statistics")
    p.add_argument("--format", choices=("json",), default="json", help="always JSON (accepted for podman users)")
    p.add_argument("--root", default=None, metavar="DIR",
                   help="the --root the container was created with (default: search every root)")
    p.add_argument("container_id")
    p.set_defaults(func=cmd_stats)
