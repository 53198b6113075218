"""One decision per trapped syscall: what the supervisor answers, and whether a fill comes first.

Pure: a notification, a view of the task (its memory and paths) and a view of the image go
in, an explicit verdict comes out; nothing is answered or fetched here.  The order is the
point:
1. the user's own profile: a syscall it denies or kills is answered so, and never fetches;
2. a complete image needs nothing, nor does an open that cannot reach a file's content
   (O_DIRECTORY, O_CREAT|O_EXCL): let it run;
3. read and resolve the path in the task's root; a placeholder that is not filled yet (or an
   executable whose interpreter chain is not known to be filled) means Fill, then Continue.
"""

from __future__ import annotations

import errno
import stat
from typing import Protocol

from seccomp.notify import Notification
from seccomp.resolve import AT_FDCWD, UNRESOLVED
from seccomp.syscalls import (
    AUDIT_ARCH_X86_64,
    CHROOT,
    OPEN_REACH_MASK,
    OPENS_REACHING_FILES,
    PATH_ARGS,
    X32_SYSCALL_BIT,
    PathArg,
    native_nr,
    signed32,
)
from seccomp.taskview import TaskView
from seccomp.verdict import KILL as PROFILE_KILL
from seccomp.verdict import Verdicts


class Continue:
    """Let the syscall run as the kernel would without us."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Continue"


class Kill:
    """The user's profile kills the caller (our filter cannot, so the supervisor does)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Kill"


class Fail:
    """Fail the syscall with `errno` without running it."""

    __slots__ = ("errno",)

    def __init__(self, err: int) -> None:
        self.errno = err

    def __repr__(self) -> str:
        return f"Fail({errno.errorcode.get(self.errno, self.errno)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Fail) and other.errno == self.errno

    def __hash__(self) -> int:
        return hash(self.errno)


class Fill:
    """Fill first (the file, and for an exec its interpreter chain), then Continue.

    hit: (filler, index) of the unfilled file or None; exec_path/cwd: for an exec, the file
    as the task names it and its cwd, both absolute in its root; chain_key: what the exec
    chain cache remembers once the chain is filled (None: do not remember).
    """

    __slots__ = ("hit", "exec_path", "cwd", "chain_key")

    def __init__(self, hit, exec_path: bytes | None = None, cwd: bytes = b"/", chain_key=None) -> None:
        self.hit = hit
        self.exec_path = exec_path
        self.cwd = cwd
        self.chain_key = chain_key

    def __repr__(self) -> str:
        return f"Fill({self.hit!r}, exec={self.exec_path!r})"


Verdict = Continue | Fail | Kill | Fill
CONTINUE = Continue()
KILL = Kill()
_FAILS: dict[int, Fail] = {}


def fail(err: int) -> Fail:
    """The (shared, immutable by convention) Fail verdict for `err`."""
    v = _FAILS.get(err)
    if v is None:
        v = _FAILS[err] = Fail(err)
    return v


class ImageView(Protocol):
    """What decide needs of the image: is it complete, is this file still a placeholder."""

    complete: bool

    def lookup(self, st):
        """(filler, index) if the file with this stat is an unfilled placeholder, else None."""

    def exec_chain_filled(self, key) -> bool:
        """Was the interpreter chain of this executable (in this root) filled already?"""


class VerdictTable:
    """The user's verdicts, looked up by syscall number in one step: for each trapped syscall
    the answer where the profile decides it whatever the arguments (CONTINUE, KILL or a Fail;
    None: evaluate the rules for this call), and where its path sits.  Built once per notify
    loop, so the hot path evaluates no rules and builds no verdicts."""

    __slots__ = ("verdicts", "steps")

    def __init__(self, verdicts: Verdicts) -> None:
        self.verdicts = verdicts
        self.steps: dict[int, tuple[Verdict | None, PathArg | None]] = {}
        for nr in (*PATH_ARGS, CHROOT):
            err = verdicts.fixed_errno(nr)
            self.steps[nr] = (None if err is None else _profile_answer(err), PATH_ARGS.get(nr))

    def step(self, nr: int, args: tuple[int, ...]) -> tuple[Verdict, PathArg | None]:
        """The profile's answer for this call and its path spec (None: no path to look at)."""
        step = self.steps.get(nr)
        if step is None:  # not a syscall we trap: only the profile's verdict applies
            return _profile_answer(self.verdicts.errno_for(nr, args)), None
        if step[0] is None:
            return _profile_answer(self.verdicts.errno_for(nr, args)), step[1]
        return step


def _profile_answer(err: int) -> Verdict:
    return CONTINUE if not err else KILL if err == PROFILE_KILL else fail(err)


def chain_key(st, root_id) -> tuple | None:
    """What identifies an executable's interpreter chain: the file (and its version) and the
    root its absolute interpreter paths are resolved in."""
    if root_id is None:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, root_id)


def decide(n: Notification, task: TaskView, verdicts: Verdicts | VerdictTable, image: ImageView) -> Verdict:
    """The verdict for one notification.  `n.nr` is rewritten to its x86_64 number.

    The notify loop passes a VerdictTable (built once); a plain Verdicts is tabled per call."""
    nr = n.nr
    if n.arch != AUDIT_ARCH_X86_64 or nr & X32_SYSCALL_BIT:
        nr = native_nr(n.arch, nr)
        if nr is None:  # not one of ours under any ABI we know: the kernel's own answer
            return fail(errno.ENOSYS)
        n.nr = nr
    table = verdicts if verdicts.__class__ is VerdictTable else VerdictTable(verdicts)
    args = n.args
    step = table.steps.get(nr)
    answer, spec = step if step is not None and step[0] is not None else table.step(nr, args)
    if answer is not CONTINUE:
        return answer
    if spec is None:
        if nr == CHROOT:
            task.root_changing(n.pid)
        return CONTINUE
    if image.complete:
        return CONTINUE
    flags = spec.flags
    if flags is not None and args[flags] & OPEN_REACH_MASK not in OPENS_REACHING_FILES:
        return CONTINUE  # cannot reach a file's content (open_reaches_file), inlined
    pid = n.pid
    path = task.read_path(pid, args[spec.path])
    if path is None:
        return CONTINUE
    dirfd = signed32(args[spec.dirfd]) if spec.dirfd is not None else AT_FDCWD
    st = task.stat(pid, dirfd, path, spec.follows(args))
    if st is None:
        return CONTINUE
    if st is UNRESOLVED:
        # Through another task's /proc/PID/root or the like: it could reach a placeholder
        # we cannot identify, and serving its zeros would be silent corruption.
        return fail(errno.EACCES)
    hit = image.lookup(st) if st.st_size else None
    if not spec.exec or not stat.S_ISREG(st.st_mode):
        return CONTINUE if hit is None else Fill(hit)
    key = chain_key(st, task.root_id(pid))
    if hit is None and key is not None and image.exec_chain_filled(key):
        return CONTINUE
    full = task.absolute(pid, dirfd, path)
    cwd = task.absolute(pid, AT_FDCWD, b"")
    if full is UNRESOLVED or full is None:
        return CONTINUE if hit is None else Fill(hit)
    if cwd is None or cwd is UNRESOLVED:
        cwd = b"/"
    return Fill(hit, exec_path=full, cwd=cwd, chain_key=key)
