"""Which syscalls the supervisor traps, and where each keeps its path.

Opens and execs need the file's content; the path syscalls that make overlayfs copy a
lower file up (chmod, chown, utimes, xattrs, truncate, rename, link) need it too, or the
empty placeholder would be copied up and the later fill would be invisible.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

AT_SYMLINK_NOFOLLOW = 0x100
AT_SYMLINK_FOLLOW = 0x400

# x86_64 numbers (the architecture runc/crun are given in the profile).
NUMBERS: dict[str, int] = {
    "open": 2, "truncate": 76, "rename": 82, "creat": 85, "link": 86, "chmod": 90, "chown": 92,
    "lchown": 94, "utime": 132, "setxattr": 188, "lsetxattr": 189, "removexattr": 197,
    "lremovexattr": 198, "utimes": 235, "openat": 257, "fchownat": 260, "futimesat": 261,
    "renameat": 264, "linkat": 265, "fchmodat": 268, "utimensat": 280, "renameat2": 316,
    "execve": 59, "execveat": 322, "openat2": 437, "fchmodat2": 452, "io_uring_setup": 425, "chroot": 161,
}
NAMES = {v: k for k, v in NUMBERS.items()}


@dataclass(frozen=True, slots=True)
class PathArg:
    """How to find the path a syscall acts on.

    dirfd: index of the dirfd argument or None (AT_FDCWD); path: index of the path pointer;
    follow: True/False, or (arg index, bit, follow-when-set) for flag-controlled following;
    flags: index of open(2)-style flags, for `cannot_touch_file`.
    """

    dirfd: int | None
    path: int
    follow: bool | tuple[int, int, bool]
    exec: bool = False
    flags: int | None = None

    def cannot_touch_file(self, args: tuple[int, ...]) -> bool:
        """An open that can neither read nor copy up an existing regular file (see
        `open_reaches_file`).  Decided from the flags alone, without reading the task's memory."""
        return self.flags is not None and not open_reaches_file(args[self.flags])

    def follows(self, args: tuple[int, ...]) -> bool:
        f = self.follow
        if isinstance(f, bool):
            return f
        idx, bit, when_set = f
        return bool(args[idx] & bit) == when_set


_NOFOLLOW_OPEN = (1, os.O_NOFOLLOW, False)
_CREAT_EXCL = os.O_CREAT | os.O_EXCL

#: The open(2) flag bits that decide whether an open can reach an existing file's content.
OPEN_REACH_MASK = os.O_DIRECTORY | os.O_CREAT | os.O_EXCL
#: `flags & OPEN_REACH_MASK` of the opens that can: neither O_DIRECTORY nor O_CREAT|O_EXCL.
#: The filter traps exactly these (three exact MASKED_EQ tests a BPF program can make).
OPENS_REACHING_FILES = (0, os.O_CREAT, os.O_EXCL)


def open_reaches_file(flags: int) -> bool:
    """Can an open with these flags read, truncate or copy up an existing regular file?

    Not with O_DIRECTORY (a file gives ENOTDIR; O_TMPFILE includes it and names no file) nor
    with O_CREAT|O_EXCL (EEXIST if anything is there, even a dangling symlink).  Everything
    else can: O_CREAT alone opens an existing file, an O_PATH fd can be chowned or reopened.
    The supervisor and the filter built from `OPENS_REACHING_FILES` must agree on this.
    """
    return flags & OPEN_REACH_MASK in OPENS_REACHING_FILES
PATH_ARGS: dict[int, PathArg] = {
    NUMBERS["open"]: PathArg(None, 0, _NOFOLLOW_OPEN, flags=1),
    NUMBERS["openat"]: PathArg(0, 1, (2, os.O_NOFOLLOW, False), flags=2),
    NUMBERS["openat2"]: PathArg(0, 1, True),
    NUMBERS["creat"]: PathArg(None, 0, True),
    NUMBERS["execve"]: PathArg(None, 0, True, exec=True),
    NUMBERS["execveat"]: PathArg(0, 1, (4, AT_SYMLINK_NOFOLLOW, False), exec=True),
    NUMBERS["truncate"]: PathArg(None, 0, True),
    NUMBERS["chmod"]: PathArg(None, 0, True),
    NUMBERS["fchmodat"]: PathArg(0, 1, True),
    NUMBERS["fchmodat2"]: PathArg(0, 1, (3, AT_SYMLINK_NOFOLLOW, False)),
    NUMBERS["chown"]: PathArg(None, 0, True),
    NUMBERS["lchown"]: PathArg(None, 0, False),
    NUMBERS["fchownat"]: PathArg(0, 1, (4, AT_SYMLINK_NOFOLLOW, False)),
    NUMBERS["utime"]: PathArg(None, 0, True),
    NUMBERS["utimes"]: PathArg(None, 0, True),
    NUMBERS["utimensat"]: PathArg(0, 1, (3, AT_SYMLINK_NOFOLLOW, False)),
    NUMBERS["futimesat"]: PathArg(0, 1, True),
    NUMBERS["setxattr"]: PathArg(None, 0, True),
    NUMBERS["lsetxattr"]: PathArg(None, 0, False),
    NUMBERS["removexattr"]: PathArg(None, 0, True),
    NUMBERS["lremovexattr"]: PathArg(None, 0, False),
    NUMBERS["rename"]: PathArg(None, 0, False),
    NUMBERS["renameat"]: PathArg(0, 1, False),
    NUMBERS["renameat2"]: PathArg(0, 1, False),
    NUMBERS["link"]: PathArg(None, 0, False),
    NUMBERS["linkat"]: PathArg(0, 1, (4, AT_SYMLINK_FOLLOW, True)),
}

#: Syscalls that the filter answers ENOSYS on its own: io_uring would bypass the trap.
DENIED_ENOSYS = ("io_uring_setup",)

#: Syscalls that change the root a task's paths resolve in: trapped so the supervisor drops
#: what it cached of that root (it resolves every path below the task's own /proc/PID/root).
ROOT_CHANGES = ("chroot",)
CHROOT = NUMBERS["chroot"]

TRAPPED_NAMES = tuple(sorted({NAMES[n] for n in PATH_ARGS} | set(ROOT_CHANGES)))
#: The trapped opens whose flags a filter can test (openat2 keeps them in a struct), and the
#: index of that argument.
OPEN_FLAGS_ARG = {NAMES[nr]: spec.flags for nr, spec in PATH_ARGS.items() if spec.flags is not None}


AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x40000000

# i386 numbers of the trapped syscalls (arch/x86/entry/syscalls/syscall_32.tbl); the path
# arguments sit in the same positions as on x86_64.
_I386: dict[int, str] = {
    5: "open", 8: "creat", 9: "link", 11: "execve", 15: "chmod", 16: "lchown", 30: "utime", 38: "rename",
    61: "chroot",
    92: "truncate", 182: "chown", 198: "lchown", 212: "chown", 226: "setxattr", 227: "lsetxattr",
    235: "removexattr", 236: "lremovexattr", 271: "utimes", 295: "openat", 298: "fchownat", 299: "futimesat",
    302: "renameat", 303: "linkat", 306: "fchmodat", 320: "utimensat", 353: "renameat2", 358: "execveat",
    425: "io_uring_setup", 437: "openat2", 452: "fchmodat2",
}
_X32_ONLY = {520: NUMBERS["execve"], 545: NUMBERS["execveat"]}


def native_nr(arch: int, nr: int) -> int | None:
    """The x86_64 number of a trapped syscall made under any x86 ABI (None: not one of ours).

    The profile names syscalls, libseccomp traps them on every listed architecture, and a
    32-bit or x32 task's numbers differ from x86_64's.
    """
    if arch == AUDIT_ARCH_X86_64:
        if nr & X32_SYSCALL_BIT:
            nr &= ~X32_SYSCALL_BIT
            return _X32_ONLY.get(nr, nr)
        return nr
    if arch == AUDIT_ARCH_I386:
        name = _I386.get(nr)
        return NUMBERS[name] if name else None
    return None


def signed32(v: int) -> int:
    """A syscall int argument (dirfd) as the kernel reads it."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v
