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
    last: float | None = None

    def escalate(signo: int, pid: int) -> bool:
        nonlocal last
        if signo not in ESCALATING:
            return False
        t = time.monotonic()
        if last is None or t - last >= ESCALATE_WINDOW:
            last = t
            return False
        if not kill():  # not created yet: stop the delegate itself
            _send(pid, signal.SIGKILL)
        return True

    return spawn_forwarding(argv, set(PROXIED), stdin_null=stdin_null, intercept=escalate)


def spawn_forwarding(argv: list[str], signals: set[int], *, stdin_null: bool = False,
                     intercept: Callable[[int, int], bool] | None = None) -> int:
    """Run argv in the foreground, pass on `signals` sent to us with kill(2), and return its
    exit status as a shell reports it (128+N for a signal).

    The signals are blocked and taken with sigwaitinfo, so none is lost between spawn and
    wait.  Signals the terminal sends (^C, SIGWINCH) already reach the child through the
    process group: si_code tells them apart, so nothing arrives twice.  `intercept(signo,
    pid)` sees every signal first and returns True when it dealt with it."""
    sigs = set(signals) | {signal.SIGCHLD}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)] if stdin_null else []
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=actions, setsigmask=old)
        while True:
            info = signal.sigwaitinfo(sigs)
            if info.si_signo == signal.SIGCHLD:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    return exit_code(status)
                continue
            if intercept is not None and intercept(info.si_signo, pid):
                continue
            if info.si_code <= 0:  # SI_USER, SI_QUEUE, SI_TKILL: someone asked us by pid
                _send(pid, info.si_signo)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _send(pid: int, signo: int) -> None:
    try:
        os.kill(pid, signo)
    except ProcessLookupError:
        pass


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for signal N."""
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code
