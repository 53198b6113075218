"""Run the layer store: mount the FUSE file system, serve until SIGTERM/SIGINT, unmount.

libfuse's own signal handlers end its loop on SIGTERM, SIGINT and SIGHUP, and `fuse_main`
unmounts before it returns, so a stopped store leaves no dead mount behind (podman then
finds no layer store and downloads layers itself)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from ..errors import LazyshimError


def serve(mountpoint: Path) -> None:
    from .. import api
    from ..store.als import hold_serving

    target = os.path.abspath(mountpoint)
    store = api.open_store()
    lock = hold_serving(store, target)
    try:
        _detach_dead(target)
        if not os.path.isdir(target):
            raise LazyshimError(f"layer-store: {mountpoint} is not a directory")
        if os.path.ismount(target):
            raise LazyshimError(f"layer-store: {mountpoint} is a mount point already")
        _serve(store, target)
    finally:
        os.close(lock)


def _serve(store, target: str) -> None:
    from .. import api

    try:
        import mfusepy
    except OSError as e:  # libfuse is not installed
        raise LazyshimError(f"layer-store: {e} (install fuse3)") from None
    from .fs import LayerStoreFS
    from .layers import StoreLayers

    for line in api.sweep_store(store):
        print(f"lazyshim: layer-store: removed {line}", file=sys.stderr)
    opts = {"foreground": True, "fsname": "lazyshim", "subtype": "lazyshim"}
    if os.geteuid() == 0:
        opts["allow_other"] = True  # podman and CRI-O in other user namespaces look layers up too
    _one_line_logs()
    fs = LayerStoreFS(StoreLayers(store), f"lazyshim: layer-store serving {target} (store {store.root})")
    try:
        mfusepy.FUSE(fs, target, **opts)
    except RuntimeError as e:
        if not fs.served:
            raise LazyshimError(f"layer-store: mounting {target} failed (libfuse: {e})") from None
    print(f"lazyshim: layer-store stopped, {target} unmounted", file=sys.stderr, flush=True)


def _detach_dead(target: str) -> None:
    """A layer store killed without unmounting (SIGKILL, a crash) leaves its mount behind,
    answering ENOTCONN once the kernel's cached attributes expire.  We hold the serving lock,
    so a lazyshim FUSE mount at `target` has no live server: detach it."""
    try:
        with open("/proc/self/mountinfo") as f:
            text = f.read()
    except OSError:
        return
    for line in text.splitlines():
        parts = line.split(" ")
        if "-" not in parts or len(parts) < 5:
            continue
        fstype = parts[parts.index("-") + 1]
        if fstype == "fuse.lazyshim" and parts[4].replace("\\040", " ") == target:
            from ..store.sysmount import detach

            print(f"lazyshim: layer-store: detaching the dead mount at {target}", file=sys.stderr)
            detach(Path(target))
            return


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        exc = record.exc_info[1] if record.exc_info else None
        why = f" ({type(exc).__name__}: {str(exc)[:200]})" if exc is not None else ""
        return f"lazyshim: layer-store: {record.getMessage()}{why}".replace("\n", " ")


def _one_line_logs() -> None:
    """mfusepy logs what an operation raised unexpectedly with its traceback: one line instead."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    logger = logging.getLogger("fuse")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING)
    logger.propagate = False
