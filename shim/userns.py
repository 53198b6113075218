"""Are we real root, or root of a user namespace (rootless)?  Several choices hang on it:
where the store lives, which xattrs overlayfs reads (`trusted.` vs `user.overlay.*`), and
whether ids outside the mapping exist."""

from __future__ import annotations

import functools
import os


@functools.cache
def in_user_namespace() -> bool:
    """True inside any user namespace other than the initial one."""
    try:
        with open("/proc/self/uid_map") as f:
            lines = f.read().split()
    except OSError:
        return False
    return lines[:3] != ["0", "0", "4294967295"]


def host_root() -> bool:
    """Real root: may use trusted.* xattrs, mknod devices, /var/lib and /run."""
    return os.geteuid() == 0 and not in_user_namespace()
