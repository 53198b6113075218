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
    """Can this delegate hand a seccomp listener fd to `listenerPath`?  The answer is kept
    per binary (path, inode, size, mtime) in the runtime dir: `features` costs every lazy
    run ~10 ms before its supervisor can start, and a binary's answer never changes."""
    key = _binary_key(delegate)
    known = _known_answers() if key is not None else {}
    if key in known and isinstance(known[key], bool):
        return known[key]
    answer = _ask_features(delegate)
    if key is not None:
        _remember_answer(key, answer)
    return answer


FEATURES_CACHE = "delegate-features.json"  # in paths.RESERVED: no container may be named so


def _binary_key(delegate: str) -> str | None:
    import shutil

    path = shutil.which(delegate) if "/" not in delegate else delegate
    if path is None:
        return None
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return f"{real}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def _cache_path() -> str:
    from .paths import runtime_dir

    return os.path.join(runtime_dir(), FEATURES_CACHE)


def _known_answers() -> dict:
    import json

    try:
        with open(_cache_path(), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _remember_answer(key: str, answer: bool) -> None:
    """Best effort (a read-only or missing runtime dir costs the probe next time)."""
    import json

    known = {k: v for k, v in _known_answers().items() if isinstance(v, bool)}
    known[key] = answer
    known = dict(list(known.items())[-16:])  # a bound: delegates come and go with upgrades
    path = _cache_path()
    tmp = f"{path}.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(known, f)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _ask_features(delegate: str) -> bool:
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
