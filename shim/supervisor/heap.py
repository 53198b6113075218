"""Keep a long-lived supervisor's C heap from growing with the fills it has done.

Fills move file data through buffers of up to tens of MiB (range responses, decompressed
chunks) from several threads at once.  glibc gives each thread its own arena and, after
the first large buffer is freed, raises its mmap threshold so later ones come from those
arenas, where freed memory mostly stays resident: a supervisor that had filled a few
hundred files of a 33k-file image held 110-125 MiB, of which its Python objects were
about 20.  Buffers above MMAP_THRESHOLD are mapped and unmapped on their own instead, and
two arenas serve all threads; nothing on the answer path allocates that much.
"""

from __future__ import annotations

MMAP_THRESHOLD = 256 << 10
ARENAS = 2
_M_MMAP_THRESHOLD = -3  # mallopt parameters (glibc's malloc.h)
_M_ARENA_MAX = -8


def bound_heap() -> bool:
    """Apply the settings (before the process starts threads); False where the C library
    has no mallopt (not glibc): nothing changes then."""
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_ARENA_MAX, ARENAS))
