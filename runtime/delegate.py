"""Which real OCI runtime we hand containers to (runc or crun), found by probing.

crun refuses hybrid cgroup v1+v2 hosts, so it is only chosen where it can work.
`LAZYSHIM_DELEGATE` names a binary explicitly.  Imported on every CLI call: os only.
"""

from __future__ import annotations

import os

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


def _which(name: str) -> str | None:
    if "/" in name:
        return os.path.abspath(name) if os.access(name, os.X_OK) and not os.path.isdir(name) else None
    for d in (os.environ.get("PATH") or os.defpath).split(os.pathsep):
        path = os.path.join(d or ".", name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def find_delegate() -> str:
    from shim import config
    from shim.errors import LazyshimError

    env = config.get("delegate")
    if env:
        path = _which(env)
        if not path:
            raise LazyshimError(f"LAZYSHIM_DELEGATE={env}: no such runtime")
        return path
    for name in ("runc", "crun"):
        path = _which(name)
        if path and not (name == "crun" and _cgroup_mode() == "hybrid"):
            return path
    raise LazyshimError("no OCI runtime found to delegate to (install runc or crun)")


def default_root(delegate: str) -> str:
    """The delegate's state root when no --root is given (runc and crun agree on the rule)."""
    name = "crun" if "crun" in os.path.basename(delegate) else "runc"
    if os.geteuid() != 0 and os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], name)
    return f"/run/{name}"
