"""Overlay mounts as /proc/PID/mountinfo describes them: which lower dirs each one uses.

Both the runtime (is this rootfs made of our trees?) and the collector (is this layer in use?)
ask it, so both read lower dirs the same way: podman mounts with short relative links (`l/XYZ`,
from <graphroot>/overlay) that lead, through its layer's `diff` symlink and our layer-store
entry, to our trees; every lower dir is therefore resolved to its real path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator


def overlay_mounts(mountinfo: str) -> Iterator[tuple[str, list[str]]]:
    """(mount point, real lower dirs bottom first) for every mount, in mountinfo order.

    Non-overlay mounts yield an empty list, so the last entry for a mount point is the one
    in effect there even when something else was mounted over an overlay."""
    for line in mountinfo.splitlines():
        parts = line.split(" ")
        if len(parts) < 10 or "-" not in parts:
            continue
        sep = parts.index("-")
        if len(parts) < sep + 4:
            continue
        target = _unescape(parts[4])
        lowers: list[str] = []
        if parts[sep + 1] == "overlay":
            base = os.path.dirname(os.path.dirname(target))  # where podman's relative links start
            for opt in _split_options(parts[sep + 3]):
                if opt.startswith("lowerdir="):
                    lowers = [os.path.realpath(os.path.join(base, _unescape(low)))
                              for low in reversed(opt[len("lowerdir="):].split(":")) if low]
        yield target, lowers


def _split_options(s: str) -> list[str]:
    """Mount options split on commas, except escaped ones (overlay escapes ',' as '\\,')."""
    out, cur, i = [], "", 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            cur += s[i:i + 2]
            i += 2
            continue
        if s[i] == ",":
            out.append(cur)
            cur = ""
        else:
            cur += s[i]
        i += 1
    out.append(cur)
    return out


def _unescape(s: str) -> str:
    return s.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")
