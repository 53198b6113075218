"""Which trap backend a lazy container gets: seccomp user notification or ptrace.

`trap` (LAZYSHIM_TRAP, or `trap =` in lazyshim.toml) is `notify`, `ptrace` or `auto`
(the default).  auto picks notification when both the kernel (`user_notif` in
/proc/sys/kernel/seccomp/actions_avail) and the delegate can deliver a listener fd, and
ptrace otherwise: the delegate's `features` (runc >= 1.1) lists the seccomp actions it
knows; crun, whose `features` came later than its listenerPath support, counts as able;
any other delegate without `features` (runc 1.0 and older) as unable.
"""

from __future__ import annotations

import functools
import os
import subprocess

from shim import config as settings
from shim.errors import LazyshimError

MODES = ("notify", "ptrace", "auto")
ACTIONS = "/proc/sys/kernel/seccomp/actions_avail"


def configured() -> str:
    mode = settings.get("trap") or "auto"
    if mode not in MODES:
        raise LazyshimError(f"trap {mode!r} (LAZYSHIM_TRAP) is not one of {', '.join(MODES)}")
    return mode


def choose(delegate: str | None = None) -> str:
    """`notify` or `ptrace` for a container handed to `delegate` (default: the one found)."""
    mode = configured()
    if mode != "auto":
        return mode
    if delegate is None:
        from .delegate import find_delegate

        delegate = find_delegate()
    return "notify" if kernel_notifies() and delegate_notifies(delegate) else "ptrace"


def kernel_notifies() -> bool:
    try:
        with open(ACTIONS) as f:
            return "user_notif" in f.read().split()
    except OSError:
        return False


@functools.lru_cache(maxsize=8)
def delegate_notifies(delegate: str) -> bool:
    """Can this delegate hand a seccomp listener fd to `listenerPath`?"""
    import json

    try:
        p = subprocess.run([delegate, "features"], capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if p.returncode != 0:
        return "crun" in os.path.basename(delegate)
    try:
        seccomp = json.loads(p.stdout).get("linux", {}).get("seccomp", {})
        return seccomp.get("enabled") is not False and "SCMP_ACT_NOTIFY" in (seccomp.get("actions") or [])
    except (ValueError, AttributeError, TypeError):
        return False
