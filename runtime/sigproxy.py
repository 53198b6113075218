"""Signals for `lazyshim run`, as podman's `--sig-proxy`: nothing may end the run without
its teardown, and the container hears what was said to us.

Before the container runs (pull, mount, supervisor start) SIGINT, SIGTERM, SIGHUP, SIGQUIT
and SIGUSR1/2 raise `Interrupted`, so the run's `finally` removes what was made.  While
the delegate runs they are forwarded to it (`runc run` passes them to the container's
init); a second SIGINT/SIGTERM within `ESCALATE_WINDOW` seconds kills the container.
Once the run is over they are only noted: the teardown is not interrupted.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

PROXIED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
ESCALATING = (signal.SIGINT, signal.SIGTERM)
ESCALATE_WINDOW = 5.0


class Interrupted(BaseException):
    """A proxied signal arrived before the container ran (BaseException: no `except
    Exception` may swallow it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Guard:
    """Install on entry to the run: proxied signals interrupt the setup."""

    def __init__(self) -> None:
        self.noted: list[int] = []
        self._old = {s: signal.signal(s, self._raise) for s in PROXIED}

    def _raise(self, signum: int, frame) -> None:
        raise Interrupted(signum)

    def _note(self, signum: int, frame) -> None:
        self.noted.append(signum)

    def hold(self) -> None:
        """From here on signals are noted, not raised: the teardown runs to its end."""
        for s in PROXIED:
            signal.signal(s, self._note)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def run_forwarding(argv: list[str], kill: Callable[[], bool], stdin_null: bool) -> int:
    """Run argv (the delegate's `run`) and wait for it, forwarding proxied signals; its exit
    status as a shell reports it (128+N for a signal).  `kill` SIGKILLs the container (False
    if the delegate had none to kill yet)."""
    sigs = set(PROXIED) | {signal.SIGCHLD}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)] if stdin_null else []
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions, setsigmask=old)
        last: float | None = None
        while True:
            info = signal.sigwaitinfo(sigs)
            if info.si_signo == signal.SIGCHLD:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    return _exit_code(status)
                continue
            if info.si_signo in ESCALATING:
                t = time.monotonic()
                if last is not None and t - last < ESCALATE_WINDOW:
                    if not kill():  # not created yet: stop the delegate itself
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    continue
                last = t
            # A terminal's ^C already reached the delegate through the process group.
            if info.si_code <= 0:
                try:
                    os.kill(pid, info.si_signo)
                except ProcessLookupError:
                    pass
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _exit_code(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code
