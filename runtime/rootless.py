"""Rootless operation: run our image and runtime verbs inside a user namespace.

An ordinary user with a subuid/subgid range gets the same namespace podman would use
(`unshare --map-root-user --map-auto`): inside it we are root of the mapped range, so
placeholder trees keep their in-image owners, whiteouts can be made, overlay can be
mounted (with `userxattr`), and runc runs as in rootless podman.  Every invocation builds
the same mapping from /etc/subuid, so the store's owners mean the same thing each time.
"""

from __future__ import annotations

import os
import pwd
import shutil
import sys

from shim.errors import LazyshimError

ENV_MARK = "LAZYSHIM_USERNS"
NEEDS_USERNS = frozenset({"pull", "run", "fetch", "rmi", "mount", "umount", "record", "gc", "ps", "logs", "stop",
                          "rm", "exec"})


def _has_subids(path: str) -> bool:
    try:
        name = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        name = ""
    try:
        with open(path) as f:
            return any(line.split(":", 1)[0] in (name, str(os.getuid())) for line in f if ":" in line)
    except OSError:
        return False


def reexec_in_userns(argv: list[str]) -> None:
    """Replace this process with the same command inside a fresh user+mount namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise LazyshimError("rootless mode needs unshare (util-linux)")
    from shim.store.layout import default_root

    from .attach import runtime_dir

    env = dict(os.environ)
    env[ENV_MARK] = "1"
    # Decide the per-user paths out here, where we know who we are.
    env.setdefault("LAZYSHIM_ROOT", str(default_root()))
    env.setdefault("LAZYSHIM_RUNTIME_DIR", str(runtime_dir()))
    cmd = [unshare, "--user", "--map-root-user", "--mount", "--propagation", "private"]
    if _has_subids("/etc/subuid") and _has_subids("/etc/subgid"):
        cmd.insert(3, "--map-auto")
    cmd += ["--", sys.executable, "-m", "runtime.main", *argv]
    sys.stdout.flush()
    os.execve(unshare, cmd, env)


def maybe_reexec(verb: str | None, argv: list[str]) -> None:
    if verb in NEEDS_USERNS and os.geteuid() != 0 and not os.environ.get(ENV_MARK):
        reexec_in_userns(argv)
