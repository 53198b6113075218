"""The keeper: a small parent that outlives its supervisor.

The process the runtime starts stays small (standard library only, one thread) and forks
the supervisor that does the work.  The supervisor hands the keeper a dup of every notify
fd it receives (SCM_RIGHTS over a socketpair).  While the keeper holds them the kernel
keeps a container's trapped syscalls waiting instead of failing them with ENOSYS, so when
the supervisor dies (SIGKILL, a crash, an upgrade in place) the keeper forks a new one,
which inherits the fds and the listening socket, restarts the syscalls the dead one left
unanswered, and serves on: the container sees a pause, not an error.

The supervisor ends with its last notify fd (exit 0) and the keeper with it; a supervisor
that fails before it is ready ends the keeper too (the runtime reports its log line).  If
the keeper itself is killed, its supervisor gets SIGKILL (PR_SET_PDEATHSIG): the runtime
stops a container's supervision by signalling the keeper.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

PR_SET_PDEATHSIG = 1
#: A supervisor that keeps dying is not restarted forever.
MAX_RESTARTS = 100
MAX_FDS_PER_MESSAGE = 1


@dataclass
class Handover:
    """What a supervisor gets from its keeper: where to announce new notify fds, the fds a
    predecessor left (fd -> pid-namespace inode of its container), and how often it was
    restarted."""

    channel: socket.socket | None
    fds: dict[int, int] = field(default_factory=dict)
    restarts: int = 0

    def ready(self) -> None:
        """The container may start: from now on a dead supervisor is worth restarting."""
        if self.channel is not None:
            try:
                self.channel.send(b'{"ready": true}')
            except OSError:
                pass

    def announce(self, fd: int, pidns: int | None) -> None:
        """Give the keeper its own reference to a new notify fd."""
        if self.channel is None:
            return
        try:
            socket.send_fds(self.channel, [json.dumps({"pidns": pidns}).encode()], [fd])
        except OSError:
            pass  # no keeper (it died): serving goes on, only restarts are lost


def keep(work: Callable[[Handover], int], close_after_start: tuple[int, ...] = ()) -> int:
    """Run `work` in a forked supervisor, again after each death by a signal; returns the
    exit code of the last supervisor.  `close_after_start`: fds only the first supervisor
    needs (the readiness pipe: the runtime must see EOF if it dies before being ready)."""
    fds: dict[int, int] = {}
    restarts = 0
    ready = False
    keeper = os.getpid()
    while True:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            mine.close()
            _die_with(keeper)
            code = 1
            try:
                code = work(Handover(theirs, dict(fds), restarts))
            finally:
                os._exit(code)
        theirs.close()
        for fd in close_after_start:
            try:
                os.close(fd)
            except OSError:
                pass
        close_after_start = ()
        ready = _hold(mine, fds) or ready
        mine.close()
        status = _reap(pid)
        # One that dies before it is ready failed to start: the runtime saw EOF on the
        # readiness pipe and gives up on the container, so nobody would need a successor.
        if not os.WIFSIGNALED(status) or not ready or restarts >= MAX_RESTARTS:
            for fd in fds:
                os.close(fd)
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1
        restarts += 1


def _hold(channel: socket.socket, fds: dict[int, int]) -> bool:
    """Collect the fds the supervisor announces; drop those whose container is gone; return
    when the supervisor's end of the channel closes (it exited or died): True if it had
    reported ready."""
    ready = False
    poller = select.poll()
    poller.register(channel, select.POLLIN)
    for fd in fds:
        poller.register(fd, 0)  # hang-up only: the keeper never reads notifications
    while True:
        for fd, ev in poller.poll():
            if fd == channel.fileno():
                try:
                    msg, got, _flags, _addr = socket.recv_fds(channel, 4096, MAX_FDS_PER_MESSAGE)
                except OSError:
                    return ready
                if not msg and not got:
                    return ready  # EOF: the supervisor is gone
                try:
                    doc = json.loads(msg)
                    pidns, ready = doc.get("pidns"), ready or doc.get("ready") is True
                except (ValueError, AttributeError):
                    pidns = None
                for nfd in got:
                    fds[nfd] = pidns if isinstance(pidns, int) else 0
                    poller.register(nfd, 0)
            elif ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                poller.unregister(fd)
                os.close(fd)
                fds.pop(fd, None)


def _reap(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            return status
        except InterruptedError:
            continue


def _die_with(parent: int) -> None:
    """Take SIGKILL when the keeper dies: no supervisor outlives the one the runtime knows."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)
