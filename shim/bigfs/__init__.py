"""Sub-file fills for big files: a small read-only FUSE file system of lazyshim's own.

A workload that maps a big file (model weights, module archives, databases) and touches a
sliver of it pays for the whole file with a whole-file fill, and seccomp sees no page
faults.  So files above a threshold whose TOC has verifiable chunks are served instead by
a FUSE file system (`shim.bigfs.fs`) that holds only those files, under the same object
names as the store's data layer, and fetches, verifies and caches them chunk by chunk on
first read or page fault.  Store v2 stacks it as a second data-only lower layer

    lowerdir=META::DATA::BIG

The metadata trees do not change: a big file's redirect names its object, overlayfs looks
it up in DATA first and in BIG only while DATA lacks it.  When every chunk of a big file is
cached and verified, the file is linked into DATA as its object, and containers started
after that read it natively (no FUSE in their path).

One FUSE server per container, in a process of its own (`python -m shim.bigfs`): it is
mounted before the container's overlay and detached with it, so it stops with the
container and leaves no mount behind; the supervisor's notify loop never shares its
interpreter (and GIL) with chunk fetches.  Containers of the same image share the cached
chunks through the store (`shim.store.partials`).
"""

from __future__ import annotations

from ..formats.toc import Entry

#: Files at least this big (bytes) with more than one verifiable chunk go through the FUSE layer.
DEFAULT_THRESHOLD = 16 << 20


def threshold() -> int:
    """The configured threshold (`big_file_threshold`, bytes; 0 turns sub-file fills off)."""
    from .. import config
    from ..errors import LazyshimError

    raw = config.get("big_file_threshold")
    if raw is None:
        return DEFAULT_THRESHOLD
    try:
        value = int(raw)
    except ValueError:
        raise LazyshimError(f"big_file_threshold={raw[:20]!r}: expected a number of bytes") from None
    if value < 0:
        raise LazyshimError(f"big_file_threshold={value}: must not be negative")
    return value


def is_big(e: Entry, limit: int) -> bool:
    """Served chunk by chunk: a regular file of at least `limit` bytes whose TOC splits it
    into several chunks, each with its own digest (or known zeros), so every chunk can be
    verified alone.  One chunk per file, or chunks without digests: whole-file fills."""
    if not limit or e.type != "reg" or e.size < limit or len(e.chunks) < 2:
        return False
    return all(c.digest or c.zeros for c in e.chunks)


def fuse_unavailable() -> str | None:
    """Why this process cannot serve a FUSE file system here, or None if it can."""
    import ctypes.util
    import importlib.util
    import os

    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not usable"
    if importlib.util.find_spec("mfusepy") is None:
        return "the mfusepy module is not installed"
    if ctypes.util.find_library("fuse3") is None:
        return "libfuse3 is not installed"
    return None
