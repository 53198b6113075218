"""The ptrace trap backend's loop: the same decide and fill path as the notify loop.

Where seccomp user notification is unusable, the filter returns SECCOMP_RET_TRACE for the
trapped syscalls and this loop is the container's tracer (seccomp/ptrace_tracer.py).  Each
seccomp stop becomes a `Notification` (its id is ours, its pid the stopped thread) and goes
through `decide`; Continue resumes the thread, Fail/Kill skip the syscall with an errno,
and a Fill goes to the fill service, which answers through `TraceAnswers` (a Notifier for
the fill service: the answer is posted back here, since only the tracer thread may resume
a tracee).  Other stops (new tasks, exec, signals, group-stops) are passed on untouched.

The loop runs in the supervisor's main thread: it seizes the tasks (when the
createRuntime hook hands over the container's init), so it must make every later ptrace
call too, and SIGCHLD, which tells it of stops, reaches a Python program only there.  It
ends when the last task it traced is gone.  Anything that goes wrong with one stop costs
that syscall an EIO and one log line; the loop goes on.
"""

from __future__ import annotations

import collections
import errno
import os
import select
import signal
from collections.abc import Callable

from seccomp.notify import Notification
from seccomp.ptrace_stops import EXEC, GONE, GROUP_STOP, NEW_TASK, SECCOMP, SIGNAL, TRACE_MARK, classify
from seccomp.ptrace_tracer import AlreadyTraced
from seccomp.syscalls import NUMBERS, TRAPPED_NAMES, native_nr
from seccomp.taskview import ProcTaskView, TaskView
from seccomp.verdict import Verdicts

from .decide import CONTINUE, KILL, Fill, ImageView, decide

_EIO = errno.EIO
_TRAPPED = frozenset(NUMBERS[name] for name in TRAPPED_NAMES)


class TraceAnswers:
    """What the fill service answers through: allow/fail post to the tracer thread."""

    fd = -1

    def __init__(self, loop: TraceLoop) -> None:
        self._loop = loop

    def id_valid(self, nid: int) -> bool:
        return nid in self._loop.pending

    def allow(self, nid: int) -> None:
        self._loop.post(("answer", nid, 0))

    def fail(self, nid: int, err: int) -> None:
        self._loop.post(("answer", nid, err))


class TraceLoop:
    """One tracer over every task of one container.

    tracer: seccomp.ptrace_tracer.Tracer (a fake in tests); verdicts, image, fill, log,
    counter, task, decide: as for NotifyLoop.
    """

    def __init__(self, tracer, verdicts: Verdicts, image: ImageView,
                 fill: Callable[[TraceAnswers, Notification, Fill], None], log: Callable[[str], None],
                 counter=None, task: TaskView | None = None, decide=decide,
                 on_attach: Callable[[], None] | None = None) -> None:
        self.tracer = tracer
        self.verdicts = verdicts
        self.image = image
        self.fill = fill
        self.log = log
        self.counter = counter
        self.task = task if task is not None else ProcTaskView()
        self.decide = decide
        self.on_attach = on_attach
        self.answers = TraceAnswers(self)
        self.tasks: set[int] = set()  # every thread being traced
        self.pending: dict[int, int] = {}  # notification id -> thread, while its fill runs
        self.attached = False
        self._next_id = 0
        self._posted: collections.deque = collections.deque()
        self._post_r, self._post_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ---- from other threads ------------------------------------------------------
    def post(self, item: tuple) -> None:
        """Queue work for the tracer thread: ("answer", id, errno) or ("attach", pid, reply)."""
        self._posted.append(item)
        try:
            os.write(self._post_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already

    # ---- the tracer thread -------------------------------------------------------
    def run(self) -> None:
        tracer = self.tracer
        wakeup, posts = tracer.wakeup_fd, self._post_r
        poller = select.poll()
        poller.register(wakeup, select.POLLIN)
        poller.register(posts, select.POLLIN)
        try:
            while not (self.attached and not self.tasks):
                for fd, _ev in poller.poll():
                    if fd == wakeup:
                        tracer.drain_wakeups()
                    elif fd == posts:
                        self._drain_posts()
                while True:
                    got = tracer.wait()
                    if got is None:
                        break
                    try:
                        self._stop(*got)
                    except Exception as e:  # noqa: BLE001 - one stop goes wrong, the container goes on
                        self.log(f"internal error at a stop of task {got[0]}: {e!r}")
                        self._resume_after_error(got[0], got[1])
        finally:
            self.task.close()
            os.close(self._post_r)
            os.close(self._post_w)

    def _drain_posts(self) -> None:
        try:
            while len(os.read(self._post_r, 4096)) == 4096:
                pass
        except BlockingIOError:
            pass
        posted = self._posted
        while posted:
            kind, a, b = posted.popleft()
            if kind != "answer":
                self._attach(a, b)
                continue
            tid = self.pending.pop(a, None)
            if tid is None:
                continue  # the task died while its fill ran
            try:
                if b:
                    self.tracer.fail(tid, b)
                else:
                    self.tracer.cont(tid)
            except Exception as e:  # noqa: BLE001 - one answer lost, the loop (and the container) goes on
                self.log(f"cannot resume task {tid} after its fill: {e!r}")

    def _attach(self, pid: int, reply: Callable[[str], None]) -> None:
        try:
            tids = self.tracer.seize_process(pid)
        except AlreadyTraced as e:
            reply(f"{e}: a task has one tracer, and the lazy root needs lazyshim's")
            return
        except OSError as e:
            reply(f"cannot trace the container's init (pid {pid}): {e.strerror or e}")
            return
        except Exception as e:  # noqa: BLE001 - the hook gets one line, the loop goes on
            reply(f"cannot trace the container's init (pid {pid}): {e!r}")
            return
        if not tids:
            reply(f"the container's init (pid {pid}) is gone")
            return
        self.tasks |= tids
        self.attached = True
        self.log(f"tracing pid {pid} ({len(tids)} threads)")
        if self.on_attach is not None:
            self.on_attach()
        reply("ok")

    def _stop(self, tid: int, status: int) -> None:
        kind, sig = classify(status)
        tracer = self.tracer
        if kind is SECCOMP:
            self.tasks.add(tid)
            self._seccomp(tid)
        elif kind is GONE:
            self.tasks.discard(tid)
            if self.pending:
                for nid in [nid for nid, t in self.pending.items() if t == tid]:
                    del self.pending[nid]
        elif kind is NEW_TASK:
            self.tasks.add(tracer.event_msg(tid))  # counted before its first stop is seen
            tracer.cont(tid)
        elif kind is EXEC:
            former = tracer.event_msg(tid)  # a thread other than the leader exec'd: its id is gone
            if former != tid:
                self.tasks.discard(former)
            self.tasks.add(tid)
            tracer.cont(tid)
        elif kind is SIGNAL:
            tracer.cont(tid, sig)
        elif kind is GROUP_STOP:
            tracer.listen(tid)
        else:
            self.tasks.add(tid)  # a new task's first stop can come before its parent's event
            tracer.cont(tid)

    def _seccomp(self, tid: int) -> None:
        tracer = self.tracer
        info = tracer.syscall(tid)
        if info is None:
            tracer.cont(tid)  # gone, or not in a seccomp stop after all: nothing to answer
            return
        arch, nr, args, data = info
        if data != TRACE_MARK and native_nr(arch, nr) not in _TRAPPED:
            # The user's own TRACE rule, and no tracer of theirs.  (A trapped syscall is ours
            # whatever its data: patch_profile takes our names out of every rule of the user's,
            # so a delegate that drops a TRACE rule's errnoRet still works.)
            tracer.fail(tid, errno.ENOSYS)
            return
        if self.counter is not None:
            self.counter.notifications += 1
        self._next_id += 1
        n = Notification(self._next_id, tid, nr, arch, args)
        try:
            verdict = self.decide(n, self.task, self.verdicts, self.image)
        except Exception as e:  # noqa: BLE001 - one syscall fails, the container goes on
            self.log(f"internal error for pid {tid} syscall {nr}: {e!r}")
            tracer.fail(tid, _EIO)
            return
        if verdict is CONTINUE:
            tracer.cont(tid)
        elif verdict.__class__ is Fill:
            self.pending[n.id] = tid
            self.fill(self.answers, n, verdict)
        elif verdict is KILL:
            # The original profile kills the caller; ours only traps, so we do.
            try:
                os.kill(tid, signal.SIGKILL)
            except OSError:
                pass
            tracer.fail(tid, errno.EPERM)
        else:
            tracer.fail(tid, verdict.errno)

    def _resume_after_error(self, tid: int, status: int) -> None:
        """Never leave a task stopped: a syscall stop fails with EIO, any other resumes."""
        kind = classify(status)[0]
        try:
            if kind is SECCOMP:
                self.tracer.fail(tid, _EIO)
            elif kind is not GONE:
                self.tracer.cont(tid)
        except Exception as e:  # noqa: BLE001
            self.log(f"cannot resume task {tid}: {e!r}")
