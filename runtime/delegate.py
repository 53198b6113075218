"""Which real OCI runtime we hand containers to (runc or crun), found by probing.

crun refuses hybrid cgroup v1+v2 hosts, so it is only chosen where it can work.
`LAZYSHIM_DELEGATE` names a binary explicitly.
"""

from __future__ import annotations

import os
import shutil

from shim.errors import LazyshimError

CGROUP2_SUPER_MAGIC = 0x63677270


def _cgroup_mode() -> str:
    """'unified', 'hybrid' or 'legacy', the way systemd names them."""
    try:
        if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            return "unified"
        if os.path.isdir("/sys/fs/cgroup/unified"):
            return "hybrid"
    except OSError:
        pass
    return "legacy"


def find_delegate() -> str:
    env = os.environ.get("LAZYSHIM_DELEGATE")
    if env:
        path = shutil.which(env)
        if not path:
            raise LazyshimError(f"LAZYSHIM_DELEGATE={env}: no such runtime")
        return path
    for name in ("runc", "crun"):
        path = shutil.which(name)
        if path and not (name == "crun" and _cgroup_mode() == "hybrid"):
            return path
    raise LazyshimError("no OCI runtime found to delegate to (install runc or crun)")
