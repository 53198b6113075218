"""A lazy container whose seccomp profile has its own agent: complete it, never bypass it.

The kernel gives a seccomp filter one listener.  When the user's profile names its own
agent (`listenerPath`, or SCMP_ACT_NOTIFY rules), lazyshim cannot put its supervisor on
the same filter without taking the agent's notifications away, and the agent may be
enforcing policy.  So the profile is left untouched, every file of the image is filled
before `create` returns, and the container runs exactly as under runc: the agent gets its
notifications, and a missing listener fails as runc fails.

The policy (`fill`, the default, or `refuse`: a one-line error instead) comes from the
bundle's annotation `run.lazyshim.agent-policy` (podman's conmon does not pass our
environment on), else $LAZYSHIM_AGENT_POLICY; `agent_policy` is the one place it is read.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from seccomp.verdict import foreign_agent
from shim.errors import LazyshimError

POLICY_ANNOTATION = "run.lazyshim.agent-policy"
POLICY_ENV = "LAZYSHIM_AGENT_POLICY"
POLICIES = ("fill", "refuse")


def agent_policy(config: dict) -> str:
    """`fill` or `refuse`: the bundle's annotation, else the environment, else `fill`."""
    annotations = config.get("annotations")
    policy = (annotations.get(POLICY_ANNOTATION) if isinstance(annotations, dict) else None) \
        or os.environ.get(POLICY_ENV) or "fill"
    if policy not in POLICIES:
        raise LazyshimError(f"agent policy {policy!r} ({POLICY_ANNOTATION} or {POLICY_ENV}) "
                            f"is not one of {', '.join(POLICIES)}")
    return policy


def foreign_reason(config: dict) -> str | None:
    """Why this config's seccomp profile belongs to someone else's agent, or None; under the
    ptrace backend also why the container would have someone else's tracer."""
    linux = config.get("linux")
    profile = linux.get("seccomp") if isinstance(linux, dict) else None
    return foreign_agent(profile) or _foreign_tracer(profile)


def _foreign_tracer(profile: object) -> str | None:
    """A task has one tracer: a profile with SCMP_ACT_TRACE rules expects its own, and a
    lazyshim that is itself traced (strace -f) passes its tracer on to runc and the
    container.  Either rules out the ptrace backend (checked first: no delegate probe when
    neither holds)."""
    from seccomp.ptrace_profile import uses_trace
    from seccomp.ptrace_stops import tracer_of

    if uses_trace(profile):
        why = "its seccomp profile sends syscalls to a tracer of its own (SCMP_ACT_TRACE)"
    elif tracer_of(os.getpid()):
        why = f"lazyshim runs under a tracer (pid {tracer_of(os.getpid())}) that would trace the container too"
    else:
        return None
    from .trap import choose

    return why if choose() == "ptrace" else None


def check_allowed(config: dict, reason: str, what: str) -> None:
    """Raise the one-line refusal when the policy says so (call before any costly work)."""
    if agent_policy(config) == "refuse":
        raise LazyshimError(f"{what}: {reason}, and a lazy rootfs would need lazyshim's own listener "
                            f"on the same filter ({POLICY_ENV}=refuse; with fill the image is fetched "
                            "in full first)")


def complete_for_agent(config: dict, reason: str, store_root: Path, layers: list[str], what: str) -> None:
    """Fill every layer now, with one warning line that says why and progress on stderr."""
    from shim import api
    from shim.lazyroot import layers_complete

    store = api.open_store(Path(store_root))
    if layers_complete(store, layers):
        return  # nothing to fetch: the container runs natively under either policy
    check_allowed(config, reason, what)
    print(f"lazyshim: warning: {what}: {reason}; a seccomp filter has one listener and a task one tracer, "
          "so the image is fetched in full before the container starts and runs without lazyshim's supervisor",
          file=sys.stderr, flush=True)
    res = api.fill_image(store, list(layers), progress=_Progress())
    print(f"lazyshim: filled {res.files_filled} files, {_mb(res.bytes_fetched)} in {res.seconds:.1f}s",
          file=sys.stderr, flush=True)


class _Progress:
    """One stderr line per tenth of the files: enough to see a big fill move, never a flood."""

    def __init__(self) -> None:
        self.shown = 0

    def __call__(self, done: int, total: int, fetched: int) -> None:
        if total <= 0:
            return
        tenth = done * 10 // total
        if tenth > self.shown and done < total:
            self.shown = tenth
            print(f"lazyshim: fetching the image: {done}/{total} files, {_mb(fetched)}",
                  file=sys.stderr, flush=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
