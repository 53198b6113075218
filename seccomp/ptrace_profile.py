"""The seccomp profile and hook for the ptrace trap backend.

The profile is `patch_profile`'s, with lazyshim's own SCMP_ACT_NOTIFY rules turned into
SCMP_ACT_TRACE rules (and no listenerPath): the same syscalls stop, everything the user's
profile decides stays as it was, and the supervisor applies the original verdicts itself,
exactly as under notification.  The rules carry TRACE_MARK as their SECCOMP_RET_DATA
(`errnoRet` of a TRACE rule, in runc and crun), so the tracer tells its own stops apart
from the user's TRACE rules, which keep their meaning (ENOSYS, as with no tracer of
theirs; a profile that wants a tracer of its own gets no lazy root at all, see
`uses_trace`).

Under RET_TRACE a task with no tracer gets ENOSYS for the trapped syscalls, so the tracer
must be attached before the filter is installed: a createRuntime hook (run by runc and
crun after the container's namespaces exist and before its init installs the filter and
waits at the exec fifo) hands the init's pid to the supervisor and returns only once it is
seized.
"""

from __future__ import annotations

import os
import sys

from .ptrace_stops import TRACE_MARK
from .verdict import NOTIFY, Verdicts, patch_profile

TRACE = "SCMP_ACT_TRACE"
HOOK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ptrace_hook.py")


def trace_profile(profile: dict | None) -> tuple[dict, Verdicts]:
    """The profile to give runc/crun for the ptrace backend, and the verdicts to apply."""
    out, verdicts = patch_profile(profile, "", "")
    out.pop("listenerPath", None)
    out.pop("listenerMetadata", None)
    for rule in out.get("syscalls") or []:
        if rule.get("action") == NOTIFY:  # only lazyshim's own: a profile with others is never patched
            rule["action"] = TRACE
            rule["errnoRet"] = TRACE_MARK
    return out, verdicts


def uses_trace(profile: object) -> bool:
    """Does the user's own profile send syscalls to a tracer (SCMP_ACT_TRACE)?  That tracer
    and lazyshim's cannot both attach.  Reads untrusted JSON: wrong types count as absent."""
    if not isinstance(profile, dict):
        return False
    if profile.get("defaultAction") == TRACE:
        return True
    rules = profile.get("syscalls")
    return isinstance(rules, list) and any(isinstance(r, dict) and r.get("action") == TRACE for r in rules)


def add_hook(config: dict, socket_path: str) -> None:
    """Append the createRuntime hook that hands the container's init to the tracer."""
    hooks = config.setdefault("hooks", {})
    hooks.setdefault("createRuntime", []).append({
        # -S: no site-packages, the hook needs only the standard library and starts quicker.
        "path": sys.executable, "args": [sys.executable, "-S", HOOK, socket_path],
    })
