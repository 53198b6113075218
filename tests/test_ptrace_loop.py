"""The ptrace loop answers every seccomp stop exactly once and passes every other stop on,
driven by a fake tracer whose tasks stop again only once they were resumed."""

from __future__ import annotations

import collections
import errno
import os
import signal
import threading

from seccomp.ptrace_stops import (
    PTRACE_EVENT_CLONE,
    PTRACE_EVENT_EXEC,
    PTRACE_EVENT_SECCOMP,
    PTRACE_EVENT_STOP,
    TRACE_MARK,
)
from seccomp.ptrace_tracer import AlreadyTraced
from seccomp.syscalls import AUDIT_ARCH_X86_64, NUMBERS
from seccomp.verdict import Verdicts
from shim.supervisor.ptrace_loop import TraceLoop
from tests.supervisor_fakes import FakeImage, FakeTask, fstat

ALLOW = Verdicts.allow_all()
MKDIR = 83  # not one of ours
EXITED = 0


def stopped(sig: int, event: int = 0) -> int:
    return ((event << 16) | (sig << 8)) | 0x7F


SECCOMP_STOP = stopped(signal.SIGTRAP, PTRACE_EVENT_SECCOMP)


def trapped(name: str | int, *args: int, data: int = TRACE_MARK):
    full = tuple(args) + (0,) * (6 - len(args))
    return (SECCOMP_STOP, (AUDIT_ARCH_X86_64, NUMBERS[name] if isinstance(name, str) else name, full, data))


class FakeTracer:
    """Each task has a script of stops: the first is reported when it is seized (or, for a
    new task, when its parent's clone event is seen), each next one after a resume."""

    def __init__(self, script: dict[int, list[tuple]]) -> None:
        self.script = {tid: collections.deque(s) for tid, s in script.items()}
        self.ready: collections.deque = collections.deque()
        self.current: dict[int, object] = {}
        self.calls: list[tuple] = []
        self.wakeup_fd, self._w = os.pipe2(os.O_NONBLOCK)
        self.seize_error: Exception | None = None

    def _next(self, tid: int) -> None:
        if self.script.get(tid):
            self.ready.append((tid, self.script[tid].popleft()))
            os.write(self._w, b"x")

    def seize_process(self, pid: int) -> set[int]:
        if self.seize_error is not None:
            raise self.seize_error
        self._next(pid)
        return {pid}

    def drain_wakeups(self) -> None:
        try:
            while os.read(self.wakeup_fd, 512):
                pass
        except BlockingIOError:
            pass

    def wait(self):
        if not self.ready:
            return None
        tid, (status, extra) = self.ready.popleft()
        self.current[tid] = extra
        if status >> 16 == PTRACE_EVENT_CLONE:
            self._next(extra)
        return tid, status

    def syscall(self, tid: int):
        return self.current[tid]

    def event_msg(self, tid: int) -> int:
        return self.current[tid]

    def cont(self, tid: int, sig: int = 0) -> None:
        self.calls.append(("cont", tid, sig))
        self._next(tid)

    def fail(self, tid: int, err: int) -> None:
        self.calls.append(("fail", tid, err))
        self._next(tid)

    def listen(self, tid: int) -> None:
        self.calls.append(("listen", tid))
        self._next(tid)


def _loop(tracer, task=None, image=None, fill=None, verdicts=ALLOW, logs=None, decide=None):
    def no_fill(answers, n, v):
        raise AssertionError("no fill expected")

    kw = {"decide": decide} if decide is not None else {}
    counter = type("C", (), {"notifications": 0})()
    loop = TraceLoop(tracer, verdicts, image or FakeImage(), fill or no_fill,
                     (logs if logs is not None else []).append, counter=counter, task=task or FakeTask(), **kw)
    return loop, counter


def _run(loop, pid: int = 100) -> list[str]:
    replies: list[str] = []
    loop.post(("attach", pid, replies.append))
    loop.run()
    return replies


def test_trapped_syscalls_are_decided_and_resumed_once_each() -> None:
    task = FakeTask({1: b"/filled"}, {b"/filled": fstat(ino=1)})
    profile = Verdicts({NUMBERS["chmod"]: [(errno.EROFS, [])]}, 0)
    tracer = FakeTracer({100: [
        trapped("openat", 0xFFFFFF9C, 1, 0),          # a filled file: runs
        trapped("chmod", 1, 0o600),                   # the user's profile denies it
        trapped(MKDIR, 1, 0o755, data=1),             # the user's own TRACE rule: ENOSYS
        trapped("openat", 0xFFFFFF9C, 1, 0, data=1),  # ours, from a delegate that dropped the mark
        (EXITED, None),
    ]})
    loop, counter = _loop(tracer, task=task, verdicts=profile)
    assert _run(loop) == ["ok"]
    assert tracer.calls == [("cont", 100, 0), ("fail", 100, errno.EROFS), ("fail", 100, errno.ENOSYS),
                            ("cont", 100, 0)]
    assert counter.notifications == 3
    assert task.closed and not loop.tasks


def test_a_fill_answers_from_another_thread_and_the_task_resumes_after_it() -> None:
    task = FakeTask({1: b"/lazy", 2: b"/bad"}, {b"/lazy": fstat(ino=1), b"/bad": fstat(ino=2)})
    image = FakeImage({1: ("filler", 0), 2: ("filler", 1)})
    handed = []

    def fill(answers, n, verdict):
        handed.append((n.pid, verdict.hit))
        assert answers.id_valid(n.id)
        ok = verdict.hit == ("filler", 0)
        threading.Thread(target=answers.allow if ok else lambda nid: answers.fail(nid, errno.EIO),
                         args=(n.id,)).start()

    tracer = FakeTracer({100: [trapped("open", 1, 0), trapped("open", 2, 0), (EXITED, None)]})
    loop, _ = _loop(tracer, task=task, image=image, fill=fill)
    _run(loop)
    assert handed == [(100, ("filler", 0)), (100, ("filler", 1))]
    assert tracer.calls == [("cont", 100, 0), ("fail", 100, errno.EIO)]
    assert not loop.pending


def test_a_task_that_dies_during_its_fill_is_never_resumed() -> None:
    tracer = FakeTracer({})
    loop, _ = _loop(tracer)
    loop.tasks = {100, 101}
    loop.pending = {7: 100, 8: 101}
    loop._stop(100, EXITED)  # SIGKILLed while stopped
    assert loop.pending == {8: 101} and loop.tasks == {101}
    loop.post(("answer", 7, 0))  # the fill finishes later
    loop._drain_posts()
    assert tracer.calls == []
    assert not loop.answers.id_valid(7) and loop.answers.id_valid(8)


def test_new_tasks_execs_signals_and_group_stops_pass_through() -> None:
    tracer = FakeTracer({
        100: [(stopped(signal.SIGTRAP, PTRACE_EVENT_CLONE), 101),  # clones 101
              (stopped(signal.SIGCHLD), None),                     # a signal for 100: delivered
              (stopped(signal.SIGSTOP, PTRACE_EVENT_STOP), None),  # group-stop: stays stopped
              (stopped(signal.SIGTRAP, PTRACE_EVENT_STOP), None),  # SIGCONT: runs on
              (EXITED, None)],
        101: [(stopped(signal.SIGTRAP, PTRACE_EVENT_STOP), None),  # its first stop
              (stopped(signal.SIGTRAP, PTRACE_EVENT_EXEC), 101),
              (EXITED, None)],
    })
    loop, _ = _loop(tracer)
    _run(loop)
    assert sorted(c for c in tracer.calls if c[1] == 100) == sorted(
        [("cont", 100, 0), ("cont", 100, signal.SIGCHLD), ("listen", 100), ("cont", 100, 0)])
    assert [c for c in tracer.calls if c[1] == 101] == [("cont", 101, 0), ("cont", 101, 0)]
    assert not loop.tasks, "the loop ends with the last task, not the first"


def test_an_exec_by_another_thread_drops_the_former_thread() -> None:
    tracer = FakeTracer({})
    loop, _ = _loop(tracer)
    loop.tasks = {100, 105}
    tracer.current[100] = 105
    loop._stop(100, stopped(signal.SIGTRAP, PTRACE_EVENT_EXEC))
    assert loop.tasks == {100} and tracer.calls == [("cont", 100, 0)]


def test_decide_raising_fails_that_syscall_with_eio_and_the_next_runs() -> None:
    seen = []

    def flaky(n, task, verdicts, image):
        seen.append(n.id)
        if len(seen) == 1:
            raise FileNotFoundError(errno.ENOENT, "task vanished mid-resolution")
        from shim.supervisor.decide import CONTINUE

        return CONTINUE

    tracer = FakeTracer({100: [trapped("open", 1, 0), trapped("open", 1, 0), (EXITED, None)]})
    logs: list[str] = []
    loop, _ = _loop(tracer, logs=logs, decide=flaky)
    _run(loop)
    assert tracer.calls == [("fail", 100, errno.EIO), ("cont", 100, 0)]
    assert len(logs) == 2 and "internal error" in logs[1] and "\n" not in logs[1]


def test_a_container_with_a_tracer_already_gets_a_one_line_refusal() -> None:
    tracer = FakeTracer({})
    tracer.seize_error = AlreadyTraced("pid 100 is traced by pid 9 already")
    loop, _ = _loop(tracer)
    replies: list[str] = []
    loop._attach(100, replies.append)
    assert len(replies) == 1 and "traced by pid 9" in replies[0] and "\n" not in replies[0]
    assert not loop.attached, "nothing is traced: the loop waits for a hook that can be served"
    tracer.seize_error = PermissionError(errno.EPERM, "Operation not permitted")
    loop._attach(100, replies.append)
    assert replies[1] == "cannot trace the container's init (pid 100): Operation not permitted"


def test_a_resume_that_fails_after_a_fill_costs_one_log_line() -> None:
    tracer = FakeTracer({})

    def broken(tid: int, sig: int = 0) -> None:
        raise RuntimeError("ptrace said no")

    tracer.cont = broken
    logs: list[str] = []
    loop, _ = _loop(tracer, logs=logs)
    loop.pending = {5: 100, 6: 101}
    loop.post(("answer", 5, 0))
    loop.post(("answer", 6, errno.EIO))
    loop._drain_posts()
    assert tracer.calls == [("fail", 101, errno.EIO)], "the next answer is still sent"
    assert len(logs) == 1 and "task 100" in logs[0]
    assert not loop.pending
