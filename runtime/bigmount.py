"""The container's FUSE layer of big files: started before its overlay, stopped after it.

`shim.bigfs` serves the big files of the image chunk by chunk; this module runs its
process for one container (mount point `<container dir>/big`, pid in `bigfs.pid`, the
chunks it saw touched in `bigfs.touched`, which the supervisor learns into the image's
profile: `record_path`; the demand board it shares with the supervisor: `demand_path`) and
tears it down.  A server that died (killed) leaves a mount
whose every access fails with ENOTCONN: `mounted` reads /proc/self/mountinfo, never stats
it.  The runtime stacks the mount as the last data-only lower layer of the container's
overlay.  Where FUSE cannot be served (no usable /dev/fuse, no libfuse3), big files are
filled whole by the supervisor, and that is said once per process on stderr.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

MOUNT = "big"
PID_FILE = "bigfs.pid"
LOG_FILE = "bigfs.log"
RECORD_FILE = "bigfs.touched"
DEMAND_FILE = "demand"
_said_unavailable = False


def record_path(cdir: Path) -> Path:
    """Where the container's FUSE server records the chunks it saw touched."""
    return cdir / RECORD_FILE


def demand_path(cdir: Path) -> Path:
    """The container's demand board (`shim.demand`): its FUSE server and its supervisor each pace
    their background fetch by the other's on-demand fetches through it."""
    return cdir / DEMAND_FILE


def start(store_root: Path, layers: list[str], sources: list[str] | None, cdir: Path,
          background: str = "none", profile: list[str] | None = None) -> tuple[Path, int] | None:
    """Mount the FUSE layer for the container at `cdir`; returns (mount point, threshold),
    or None when the image has no big file to serve that way (or FUSE is unavailable).
    `background`: the container's background fetch mode (`none`: no chunk unasked);
    `profile`: the start-up profile flags of its command (`attach.profile_flags`)."""
    from shim import bigfs
    from shim.bigfs.plan import served
    from shim.store.layout import Store

    from .attach import last_log_line, start_daemon

    limit = bigfs.threshold()
    if not served(Store(store_root), layers, limit):
        return None
    reason = bigfs.fuse_unavailable()
    if reason is not None:
        _unavailable(reason)
        return None
    mnt = cdir / MOUNT
    mnt.mkdir(mode=0o700, exist_ok=True)
    ready_r, ready_w = os.pipe()
    argv = [sys.executable, "-m", "shim.bigfs", "--store", str(store_root), "--layers", ",".join(layers),
            "--mount", str(mnt), "--threshold", str(limit), "--ready-fd", str(ready_w),
            "--log", str(cdir / LOG_FILE), "--record", str(record_path(cdir)), "--background", background,
            "--demand", str(demand_path(cdir)),
            *(profile or [])] + (["--sources", ",".join(sources)] if sources else [])
    _, ok = start_daemon(argv, ready_r, ready_w, cdir / PID_FILE)
    if not ok:
        (cdir / PID_FILE).unlink(missing_ok=True)
        _unavailable(f"the FUSE layer did not start ({last_log_line(cdir / LOG_FILE, 'bigfs: ')})")
        return None
    return mnt, limit


def stop(cdir: Path) -> None:
    """Detach the FUSE mount (after the overlay on it) and stop its server; safe to repeat."""
    from shim.store.sysmount import detach

    mnt = cdir / MOUNT
    if mounted(cdir):
        detach(mnt)
    try:
        pid = int((cdir / PID_FILE).read_text())
        if b"shim.bigfs" in Path(f"/proc/{pid}/cmdline").read_bytes():  # not a reused pid
            os.kill(pid, signal.SIGTERM)
    except (OSError, ValueError):
        pass
    (cdir / PID_FILE).unlink(missing_ok=True)


def mounted(cdir: Path) -> bool:
    """The FUSE layer is mounted, alive or not (os.path.ismount stats it: a dead server's mount
    answers ENOTCONN, which ismount takes for "not a mount point")."""
    from shim.store.sysmount import mounts_below

    return os.path.join(os.path.realpath(cdir), MOUNT) in mounts_below(cdir)


def _unavailable(reason: str) -> None:
    global _said_unavailable
    if not _said_unavailable:
        _said_unavailable = True
        print(f"lazyshim: {reason}: big files are filled whole", file=sys.stderr)
