"""The notify loop answers every notification exactly once, whatever decide or a fill does."""

from __future__ import annotations

import errno

from seccomp.verdict import Verdicts
from shim.supervisor.notify_loop import NotifyLoop
from tests.supervisor_fakes import FakeImage, FakeNotifier, FakeTask, fstat, note

ALLOW = Verdicts.allow_all()


def _loop(notifier, task, image, fill=None, logs=None):
    def no_fill(notifier, n, v):
        raise AssertionError("no fill expected")

    return NotifyLoop(notifier, ALLOW, image, fill or no_fill, (logs if logs is not None else []).append, task=task)


def test_resolver_raising_fails_that_call_with_eio_and_the_next_succeed() -> None:
    task = FakeTask({1: b"/a", 2: b"/b"}, {b"/a": fstat(ino=1), b"/b": fstat(ino=2)})
    task.raise_on.add(b"/a")
    notes = [note("openat", -100, 1, 0, nid=10), note("openat", -100, 1, 0, nid=11),
             note("openat", -100, 2, 0, nid=12)]
    notifier, logs = FakeNotifier(notes), []
    _loop(notifier, task, FakeImage(), logs=logs).run()
    assert notifier.answers == {10: errno.EIO, 11: "continue", 12: "continue"}
    assert len(logs) == 1 and "internal error" in logs[0] and "\n" not in logs[0]
    assert task.closed, "POLLHUP ends the loop and releases the task view"


def test_a_fill_that_cannot_be_handed_over_still_gets_one_answer() -> None:
    task = FakeTask({1: b"/a"}, {b"/a": fstat(ino=1)})
    handed = []

    def fill(notifier, n, v):
        handed.append(n.id)
        if n.id == 20:
            raise RuntimeError("pool gone")
        notifier.allow(n.id)

    notifier = FakeNotifier([note("openat", -100, 1, 0, nid=20), note("openat", -100, 1, 0, nid=21)])
    _loop(notifier, task, FakeImage({1: ("f", 0)}), fill=fill).run()
    assert handed == [20, 21]
    assert notifier.answers == {20: errno.EIO, 21: "continue"}


def test_every_verdict_kind_is_answered() -> None:
    profile = Verdicts({2: [(errno.EROFS, [])]}, 0)  # open(2) denied
    notifier = FakeNotifier([note("open", 1, nid=1)])
    NotifyLoop(notifier, profile, FakeImage(), lambda *a: None, [].append, task=FakeTask()).run()
    assert notifier.answers == {1: errno.EROFS}


def test_a_loop_that_waits_in_recv_goes_on_after_an_interruption_and_ends_when_no_target_is_left() -> None:
    task = FakeTask({1: b"/a"}, {b"/a": fstat(ino=1)})
    notifier = FakeNotifier([note("openat", -100, 1, 0, nid=30), None, note("openat", -100, 1, 0, nid=31)],
                            recv_waits=True)
    _loop(notifier, task, FakeImage()).run()
    assert notifier.answers == {30: "continue", 31: "continue"}
    assert notifier.recvs == 4, "three notifications, then one RECV that finds no target left"
    assert task.closed


def test_the_kernels_struct_sizes_are_asked_once_and_cover_ours() -> None:
    from seccomp.notify import notif_sizes

    notif, resp, data = notif_sizes()
    assert notif >= 80 and resp >= 24 and data >= 64
    assert notif_sizes() is notif_sizes()
