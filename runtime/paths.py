"""Where the runtime keeps per-container state.  Imported on every CLI call: os only.

    RUNTIME_DIR/<id>/                      a standalone `lazyshim run` container
    RUNTIME_DIR/oci/<root key>/<id>/       a lazy bundle created through the runc CLI
        orig-bundle   the bundle the caller gave (what `state` reports)
        bundle/       the private bundle handed to the delegate (patched config.json)
        seccomp.sock, supervisor.pid, supervisor.log, verdicts.json, stats.json
        mounted       present if we mounted the rootfs overlay ourselves (annotation)

runc keys containers by (--root, id), so we do too: the same id under two roots (podman's
and containerd's) are two containers.
"""

from __future__ import annotations

import os

# Names under RUNTIME_DIR that are not standalone containers.
RESERVED = frozenset({"oci", "sock", "delegate"})


def runtime_dir() -> str:
    from shim import config

    env = config.get("runtime_dir")
    if env:
        return env
    if os.geteuid() == 0 and _initial_userns():
        return "/run/lazyshim"
    xdg = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/lazyshim-{os.geteuid()}"
    return os.path.join(xdg, "lazyshim")


def _initial_userns() -> bool:
    """Real root, not root of a rootless user namespace (which cannot write /run)."""
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split()[:3] == ["0", "0", "4294967295"]
    except OSError:
        return True


def valid_id(container_id: str) -> bool:
    """runc's rule (`^[\\w+-\\.]+$`), and never `.` or `..`: ids become path components."""
    if not container_id or container_id in (".", "..") or len(container_id) > 1024:
        return False
    return all(c.isascii() and (c.isalnum() or c in "_+-.") for c in container_id)


def root_key(root: str) -> str:
    """A delegate --root as one readable path component."""
    return os.path.abspath(root).replace("%", "%25").replace("/", "%2F")


def oci_state_dir(root: str, container_id: str) -> str:
    if not valid_id(container_id):
        raise ValueError(f"invalid container ID format: {container_id!r}")
    return os.path.join(runtime_dir(), "oci", root_key(root), container_id)
