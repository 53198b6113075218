"""Patching a seccomp profile for NOTIFY must never widen it: the supervisor answers every
trapped syscall with the verdict the original profile would have given."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest

from seccomp.syscalls import AUDIT_ARCH_I386, AUDIT_ARCH_X86_64, NUMBERS, TRAPPED_NAMES, native_nr
from seccomp.verdict import KILL, Verdicts, original_verdicts, patch_profile

OPENAT, CHMOD, EXECVE = NUMBERS["openat"], NUMBERS["chmod"], NUMBERS["execve"]
ARGS0 = (0,) * 6


def test_no_profile_allows_everything_and_adds_one_notify_rule() -> None:
    out, v = patch_profile(None, "/run/x.sock", "meta")
    assert out["defaultAction"] == "SCMP_ACT_ALLOW"
    assert out["listenerPath"] == "/run/x.sock" and out["listenerMetadata"] == "meta"
    notify = [r for r in out["syscalls"] if r["action"] == "SCMP_ACT_NOTIFY"]
    assert len(notify) == 1 and set(notify[0]["names"]) == set(TRAPPED_NAMES)
    assert v.errno_for(OPENAT, ARGS0) == 0
    # io_uring would bypass the trap: answered ENOSYS by the filter itself
    uring = [r for r in out["syscalls"] if "io_uring_setup" in r["names"]]
    assert uring and uring[0]["action"] == "SCMP_ACT_ERRNO" and uring[0]["errnoRet"] == errno.ENOSYS


def test_trapped_names_are_taken_out_of_earlier_rules() -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
        "syscalls": [{"names": ["openat", "read", "chmod"], "action": "SCMP_ACT_ALLOW"}],
    }
    out, v = patch_profile(profile, "/s", "")
    allow = out["syscalls"][0]
    assert allow["names"] == ["read"]
    assert out["syscalls"][-1]["action"] == "SCMP_ACT_NOTIFY"
    assert profile["syscalls"][0]["names"] == ["openat", "read", "chmod"], "input must not be modified"
    assert v.errno_for(OPENAT, ARGS0) == 0 and v.errno_for(CHMOD, ARGS0) == 0
    assert v.errno_for(EXECVE, ARGS0) == 38, "a syscall the profile never allowed stays denied"


def test_conditions_and_first_rule_wins() -> None:
    o_creat = os.O_CREAT
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["openat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EROFS,
             "args": [{"index": 2, "value": o_creat, "valueTwo": o_creat, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["openat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EACCES},
            {"names": ["chmod"], "action": "SCMP_ACT_KILL"},
        ],
    }
    v = Verdicts.from_json(original_verdicts(profile).to_json())  # survives the trip to the supervisor
    assert v.errno_for(OPENAT, (0, 0, o_creat | os.O_WRONLY, 0, 0, 0)) == errno.EROFS
    assert v.errno_for(OPENAT, (0, 0, os.O_RDONLY, 0, 0, 0)) == errno.EACCES
    assert v.errno_for(CHMOD, ARGS0) == KILL


@pytest.mark.parametrize("op,value,arg,expected", [
    ("SCMP_CMP_EQ", 5, 5, True), ("SCMP_CMP_NE", 5, 5, False), ("SCMP_CMP_LT", 5, 4, True),
    ("SCMP_CMP_LE", 5, 5, True), ("SCMP_CMP_GT", 5, 5, False), ("SCMP_CMP_GE", 5, 5, True),
])
def test_comparison_ops(op: str, value: int, arg: int, expected: bool) -> None:
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["openat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                             "args": [{"index": 0, "value": value, "op": op}]}]}
    assert (original_verdicts(profile).errno_for(OPENAT, (arg, 0, 0, 0, 0, 0)) == 1) is expected


def test_containers_default_profile_is_not_widened() -> None:
    path = Path("/usr/share/containers/seccomp.json")
    if not path.exists():
        pytest.skip("containers-common's default profile is not installed")
    from runtime.run import _oci_profile

    profile = _oci_profile(json.loads(path.read_text()))
    out, v = patch_profile(profile, "/s", "")
    for rule in out["syscalls"][:-1]:
        assert not set(rule["names"]) & set(TRAPPED_NAMES)
    assert v.errno_for(OPENAT, ARGS0) == 0
    assert v.default == errno.ENOSYS  # default ERRNO(38) kept for everything not listed


def test_native_numbers_across_x86_abis() -> None:
    assert native_nr(AUDIT_ARCH_X86_64, OPENAT) == OPENAT
    assert native_nr(AUDIT_ARCH_I386, 295) == OPENAT
    assert native_nr(AUDIT_ARCH_I386, 11) == EXECVE
    assert native_nr(AUDIT_ARCH_X86_64, 0x40000000 | 520) == EXECVE  # x32 execve
    assert native_nr(0xDEAD, 1) is None


def test_syscall_table_agrees_with_python_ptrace() -> None:
    """Our x86_64 numbers are hard-coded (the supervisor must not pay ptrace's import at
    start-up); python-ptrace's table is the independent check."""
    from ptrace.syscall.linux.x86_64 import SYSCALL_NAMES

    for name, nr in NUMBERS.items():
        if nr in SYSCALL_NAMES:  # python-ptrace's table predates openat2/fchmodat2
            assert SYSCALL_NAMES[nr] == name, (name, nr, SYSCALL_NAMES[nr])
    known = [n for n in NUMBERS.values() if n in SYSCALL_NAMES]
    assert len(known) >= len(NUMBERS) - 3
