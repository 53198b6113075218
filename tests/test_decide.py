"""decide(): the user's profile first, then "complete", then the path; no root needed."""

from __future__ import annotations

import errno
import os

from seccomp.syscalls import AUDIT_ARCH_I386, NUMBERS
from seccomp.verdict import Verdicts, original_verdicts
from shim.supervisor.decide import CONTINUE, KILL, Fail, Fill, chain_key, decide
from tests.supervisor_fakes import UNRESOLVED, FakeImage, FakeTask, fstat, note

ALLOW = Verdicts.allow_all()
PATH = 0x1000


def _task(path: bytes = b"/app/file", st=None) -> FakeTask:
    return FakeTask({PATH: path}, {path: st if st is not None else fstat(ino=5)})


def test_denied_by_the_users_profile_never_reads_or_fetches() -> None:
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["openat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EROFS},
                            {"names": ["chmod"], "action": "SCMP_ACT_KILL"}]}
    v = original_verdicts(profile)
    task, image = _task(), FakeImage({5: ("filler", 0)})
    assert decide(note("openat", -100, PATH, os.O_RDONLY), task, v, image) == Fail(errno.EROFS)
    assert decide(note("chmod", PATH, 0o600), task, v, image) is KILL
    assert task.calls == [], "a denied syscall must not touch the task, let alone fetch"


def test_complete_image_answers_without_reading_the_path() -> None:
    task = _task()
    assert decide(note("openat", -100, PATH, 0), task, ALLOW, FakeImage(complete=True)) is CONTINUE
    assert task.calls == []


def test_unfilled_placeholder_needs_a_fill_and_a_filled_file_does_not() -> None:
    task = _task()
    v = decide(note("openat", -100, PATH, 0), task, ALLOW, FakeImage({5: ("filler", 3)}))
    assert isinstance(v, Fill) and v.hit == ("filler", 3) and v.exec_path is None
    assert task.names() == ["read_path", "stat"]
    assert decide(note("openat", -100, PATH, 0), _task(), ALLOW, FakeImage()) is CONTINUE


def test_dirfd_and_nofollow_reach_the_resolver() -> None:
    task = _task(b"rel")
    decide(note("openat", 5, PATH, os.O_NOFOLLOW), task, ALLOW, FakeImage())
    assert task.calls[1] == ("stat", 100, 5, b"rel", False)
    task = _task(b"rel")
    decide(note("openat", 0xFFFFFF9C, PATH, 0), task, ALLOW, FakeImage())  # AT_FDCWD as a u32
    assert task.calls[1] == ("stat", 100, -100, b"rel", True)


def test_unresolvable_path_is_refused_and_missing_or_unreadable_ones_run() -> None:
    assert decide(note("openat", -100, PATH, 0), _task(st=UNRESOLVED), ALLOW, FakeImage()) == Fail(errno.EACCES)
    missing = FakeTask({PATH: b"/nope"}, {})
    assert decide(note("openat", -100, PATH, 0), missing, ALLOW, FakeImage()) is CONTINUE
    assert decide(note("openat", -100, 0x2000, 0), _task(), ALLOW, FakeImage()) is CONTINUE


def test_empty_files_and_unknown_abis() -> None:
    task = _task(st=fstat(size=0, ino=5))
    assert decide(note("openat", -100, PATH, 0), task, ALLOW, FakeImage({5: ("f", 0)})) is CONTINUE
    n = note("openat", -100, PATH, 0, arch=0xDEAD)
    assert decide(n, _task(), ALLOW, FakeImage()) == Fail(errno.ENOSYS)
    n = note("openat", -100, PATH, 0, arch=AUDIT_ARCH_I386)
    n.nr = 295  # i386 openat: decided as the x86_64 one
    assert isinstance(decide(n, _task(), ALLOW, FakeImage({5: ("f", 0)})), Fill)


def test_exec_fills_the_chain_once_per_executable_and_root() -> None:
    st = fstat(ino=9)
    task = FakeTask({PATH: b"/bin/tool"}, {b"/bin/tool": st})
    image = FakeImage()
    v = decide(note("execve", PATH), task, ALLOW, image)
    assert isinstance(v, Fill) and v.hit is None and v.exec_path == b"/bin/tool" and v.cwd == b"/work"
    assert v.chain_key == chain_key(st, (7, 2))
    image.chains.add(v.chain_key)
    task.calls.clear()
    assert decide(note("execve", PATH), task, ALLOW, image) is CONTINUE
    assert "absolute" not in task.names(), "a known chain reads no ELF header and goes to no pool"
    # The same file changed (new mtime) is walked again.
    task.files[b"/bin/tool"] = fstat(ino=9, mtime_ns=2)
    assert isinstance(decide(note("execve", PATH), task, ALLOW, image), Fill)


def test_chroot_tells_the_task_view_and_runs_if_the_profile_allows() -> None:
    task = FakeTask()
    assert decide(note("chroot", PATH), task, ALLOW, FakeImage()) is CONTINUE
    assert task.calls == [("root_changing", 100)]
    denied = original_verdicts({"defaultAction": "SCMP_ACT_ALLOW",
                                "syscalls": [{"names": ["chroot"], "action": "SCMP_ACT_ERRNO"}]})
    task = FakeTask()
    assert decide(note("chroot", PATH), task, denied, FakeImage()) == Fail(errno.EPERM)
    assert task.calls == []


def test_opens_that_cannot_reach_a_files_content_are_not_resolved() -> None:
    image = FakeImage({5: ("filler", 0)})
    for flags in (os.O_DIRECTORY, os.O_DIRECTORY | os.O_PATH, os.O_CREAT | os.O_EXCL | os.O_WRONLY):
        task = _task()
        assert decide(note("openat", -100, PATH, flags), task, ALLOW, image) is CONTINUE
        assert decide(note("open", PATH, flags), task, ALLOW, image) is CONTINUE
        assert task.calls == []
    # O_CREAT alone may open (and truncate) an existing file; O_PATH fds can chown it: both fill.
    for flags in (os.O_CREAT | os.O_WRONLY, os.O_PATH, os.O_EXCL):
        assert isinstance(decide(note("openat", -100, PATH, flags), _task(), ALLOW, image), Fill)


def test_the_verdict_table_gives_what_the_rules_give() -> None:
    """The table answers by number where the profile ignores the arguments and evaluates the
    rules where it does not; either way decide's verdict is the one of the plain Verdicts."""
    from shim.supervisor.decide import VerdictTable

    profile = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": errno.ENOSYS,
               "syscalls": [{"names": ["openat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EROFS,
                             "args": [{"index": 2, "value": os.O_CREAT, "valueTwo": os.O_CREAT,
                                       "op": "SCMP_CMP_MASKED_EQ"}]},
                            {"names": ["openat", "open", "execve"], "action": "SCMP_ACT_ALLOW"},
                            {"names": ["chmod"], "action": "SCMP_ACT_KILL"}]}
    v = original_verdicts(profile)
    table = VerdictTable(v)
    assert table.steps[NUMBERS_OPENAT][0] is None, "openat depends on its flags: evaluated per call"
    assert table.steps[NUMBERS_OPEN][0] is CONTINUE and table.steps[NUMBERS_CHMOD][0] is KILL
    assert table.steps[NUMBERS_CHOWN][0] == Fail(errno.ENOSYS), "the default decides what no rule names"
    image = FakeImage({5: ("filler", 0)})
    calls = [note("openat", -100, PATH, os.O_RDONLY), note("openat", -100, PATH, os.O_CREAT | os.O_WRONLY),
             note("openat", -100, PATH, os.O_DIRECTORY), note("open", PATH, 0), note("chmod", PATH, 0o600),
             note("chown", PATH, 0, 0), note("execve", PATH), note("chroot", PATH)]
    for n in calls:
        by_table = decide(note_copy(n), _task(), table, image)
        by_rules = decide(note_copy(n), _task(), v, image)
        assert repr(by_table) == repr(by_rules), (n.nr, by_table, by_rules)
    assert decide(note("openat", -100, PATH, os.O_CREAT), _task(), table, image) == Fail(errno.EROFS)


def note_copy(n):
    from seccomp.notify import Notification

    return Notification(n.id, n.pid, n.nr, n.arch, n.args)


NUMBERS_OPENAT, NUMBERS_OPEN, NUMBERS_CHMOD, NUMBERS_CHOWN = (NUMBERS[n] for n in ("openat", "open", "chmod", "chown"))
