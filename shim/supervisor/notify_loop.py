"""Receive notifications on one notify fd and answer each exactly once, whatever happens.

The loop knows nothing of images: it asks `decide` for a verdict and either answers it at
once or hands a Fill to the fill service, which answers when the fill is done.  Anything
that goes wrong while deciding or answering one notification costs that syscall an EIO and
one log line; the loop goes on.  POLLHUP (the last target exited) ends it: after that,
RECV would fail at once, forever.

Why a CONTINUE needs no ID_VALID check although the path was read from the target's memory
after the kernel queued the call: if the target died meanwhile and its pid was reused, the
path read may be another task's, but the answer goes to a notification id that no longer
exists (SEND fails with ENOENT, ignored), so nothing runs on that guess; at worst another
file was filled needlessly (with verified bytes).  A Fill's answer checks ID_VALID before
failing a call that is gone, and a Kill checks it before signalling the pid (the one answer
that acts on something other than the notification).  What no check here can close is the
target's own race (seccomp_unotify(2)): another thread of it rewriting the path between our
read and the kernel's, which only the racing container itself can exploit, against itself.
This is the hot path of every trapped open: no logging, no statistics beyond one counter, no
allocation beyond the notification and its answer buffer.
"""

from __future__ import annotations

import errno
import os
import select
import signal
from collections.abc import Callable

from seccomp.notify import Notification, Notifier
from seccomp.taskview import ProcTaskView, TaskView
from seccomp.verdict import Verdicts

from .decide import CONTINUE, KILL, Fill, ImageView, Verdict, VerdictTable, decide

_EIO = errno.EIO
_END = select.POLLHUP | select.POLLERR | select.POLLNVAL


def answer(notifier: Notifier, n: Notification, verdict: Verdict) -> None:
    """Send the answer a (non-Fill) verdict stands for."""
    if verdict is CONTINUE:
        notifier.allow(n.id)
    elif verdict is KILL:
        # The original profile kills the caller; ours cannot, so we do.
        if notifier.id_valid(n.id):  # the pid is still the caller's
            try:
                os.kill(n.pid, signal.SIGKILL)
            except OSError:
                pass
        notifier.fail(n.id, errno.EPERM)
    else:
        notifier.fail(n.id, verdict.errno)


def fail_quietly(notifier: Notifier, nid: int, err: int = _EIO) -> None:
    """Answer with an error, for paths where something already went wrong."""
    try:
        notifier.fail(nid, err)
    except OSError:
        pass


class NotifyLoop:
    """One thread's loop over one notify fd.

    verdicts, image: what `decide` weighs (the user's profile, the image's fill state);
    fill: (notifier, notification, Fill) -> None, which takes over answering; counter: an
    object whose `notifications` it counts; task: the task view (a fake in tests).
    """

    def __init__(self, notifier: Notifier, verdicts: Verdicts, image: ImageView,
                 fill: Callable[[Notifier, Notification, Fill], None], log: Callable[[str], None],
                 counter=None, task: TaskView | None = None, decide=decide) -> None:
        self.notifier = notifier
        self.verdicts = VerdictTable(verdicts)  # looked up, not evaluated, per notification
        self.image = image
        self.decide = decide
        self.fill = fill
        self.log = log
        self.counter = counter
        # The task view's fd caches belong to this thread alone: a closed-and-reused fd
        # number seen by another thread could otherwise read the wrong task's memory.
        self.task = task if task is not None else ProcTaskView()

    def run(self) -> None:
        notifier, decide, task, counter = self.notifier, self.decide, self.task, self.counter
        verdicts, image = self.verdicts, self.image
        recv, allow = notifier.recv, notifier.allow
        # Where RECV itself waits for the next notification and returns once no target is
        # left (see Notifier.recv_waits), the loop sleeps in RECV: one syscall less per
        # notification than poll-then-RECV, and poll only to tell an interrupted
        # notification from the end.  Elsewhere it polls first, and POLLHUP ends it.
        waits = getattr(notifier, "recv_waits", False)
        poller = select.poll()
        poller.register(notifier.fd, select.POLLIN)
        try:
            while True:
                if not waits:
                    events = poller.poll()
                    if not events:
                        continue
                    ev = events[0][1]
                    if not ev & select.POLLIN:
                        if ev & _END:
                            return
                        continue
                try:
                    n = recv()
                except OSError as e:
                    self.log(f"notify fd {notifier.fd}: receive failed: {e}")
                    return  # the fd itself is unusable: nothing more can arrive on it
                if n is None:
                    if waits:
                        events = poller.poll(0)
                        if events and not events[0][1] & select.POLLIN and events[0][1] & _END:
                            return
                    continue
                if counter is not None:
                    counter.notifications += 1
                try:
                    verdict = decide(n, task, verdicts, image)
                    if verdict is CONTINUE:  # the common answer, without a call to `answer`
                        allow(n.id)
                    elif verdict.__class__ is Fill:
                        self.fill(notifier, n, verdict)
                    else:
                        answer(notifier, n, verdict)
                except Exception as e:  # noqa: BLE001 - one syscall fails, the container goes on
                    self.log(f"internal error for pid {n.pid} syscall {n.nr}: {e!r}")
                    fail_quietly(notifier, n.id)
        finally:
            task.close()
            notifier.close()
