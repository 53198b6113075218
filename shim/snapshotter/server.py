"""Run the snapshotter: open the state, listen on the socket, stop cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

from ..errors import LazyshimError


def serve(address: Path, root: Path, store_root: Path) -> None:
    from .lazy import StoreLayers
    from .service import SnapshotService, make_server
    from .snapshots import Snapshots

    layers = StoreLayers(store_root)
    snaps = Snapshots(root, layers.lowerdir)
    try:
        for line in layers.sweep():  # a snapshotter killed mid-Prepare left a staging dir
            print(f"lazyshim: snapshotter: removed {line}", file=sys.stderr)
        address.parent.mkdir(parents=True, exist_ok=True)
        if address.is_socket():
            address.unlink()  # ours from an earlier run: the root's lock says no one serves it
        elif address.exists():
            raise LazyshimError(f"{address} exists and is not a socket")
        old_umask = os.umask(0o177)  # the socket is created 0600: containerd runs as root
        try:
            server = make_server(SnapshotService(snaps, layers), str(address))
            server.start()
        finally:
            os.umask(old_umask)
        try:
            stop = threading.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: stop.set())
            print(f"lazyshim: snapshotter serving {address} (root {root}, store {layers.store.root})",
                  file=sys.stderr, flush=True)
            stop.wait()
            server.stop(grace=5).wait()
        finally:
            with contextlib.suppress(OSError):
                address.unlink()
    finally:
        snaps.close()
