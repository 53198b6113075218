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


def test_no_profile_allows_everything_and_traps_every_name() -> None:
    out, v = patch_profile(None, "/run/x.sock", "meta")
    assert out["defaultAction"] == "SCMP_ACT_ALLOW"
    assert out["listenerPath"] == "/run/x.sock" and out["listenerMetadata"] == "meta"
    notify = [r for r in out["syscalls"] if r["action"] == "SCMP_ACT_NOTIFY"]
    unconditional = [r for r in notify if not r.get("args")]
    assert len(unconditional) == 1 and set(unconditional[0]["names"]) == set(TRAPPED_NAMES) - {"open", "openat"}
    assert {n for r in notify for n in r["names"]} == set(TRAPPED_NAMES)
    assert all(r["action"] == "SCMP_ACT_NOTIFY" for r in out["syscalls"] if {"open", "openat"} & set(r["names"]))
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
    for rule in out["syscalls"]:
        if set(rule["names"]) & set(TRAPPED_NAMES):
            assert rule["action"] == "SCMP_ACT_NOTIFY" or (rule.get("args") and len(rule["names"]) == 1), rule
    for flags in _flag_combinations():
        for name in ("open", "openat"):
            _assert_kernel_agrees(profile, out, name, flags)
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


# ---- opens that cannot reach a file are left out of the filter, with the user's verdict ----
O_D, O_C, O_E = os.O_DIRECTORY, os.O_CREAT, os.O_EXCL


def _flag_combinations() -> list[int]:
    base = [0, O_D, O_C, O_E, O_C | O_E, O_D | O_C, O_D | O_E, O_D | O_C | O_E]
    extra = [0, os.O_WRONLY, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, os.O_PATH, os.O_TRUNC | os.O_APPEND]
    return [b | x for b in base for x in extra]


def _kernel_action(out: dict, name: str, args: tuple[int, ...]) -> tuple[str, int | None]:
    """What libseccomp builds from `out` does for one call: an unconditional rule overrides
    every conditional one of the same syscall (seen in its exported filter), else the matching
    conditional rules (which must agree), else the default action."""
    rules = [r for r in out["syscalls"] if name in r["names"]]
    plain = [r for r in rules if not r.get("args")]
    if plain:
        return plain[0]["action"], plain[0].get("errnoRet")
    hits = {(r["action"], r.get("errnoRet")) for r in rules
            if all((args[a["index"]] & a["value"]) == a["valueTwo"] for a in r["args"])}
    assert len(hits) <= 1, f"{name} {args}: overlapping rules disagree: {hits}"
    return hits.pop() if hits else (out["defaultAction"], out.get("defaultErrnoRet"))


def _assert_kernel_agrees(profile: dict | None, out: dict, name: str, flags: int) -> None:
    from seccomp.syscalls import OPEN_FLAGS_ARG, open_reaches_file

    args = [0] * 6
    args[OPEN_FLAGS_ARG[name]] = flags
    action, err = _kernel_action(out, name, tuple(args))
    expected = original_verdicts(profile).errno_for(NUMBERS[name], tuple(args))
    if action == "SCMP_ACT_NOTIFY":
        # The supervisor answers it, with `expected`: only opens that may need a fill get here,
        # unless the user's verdict depends on the arguments.
        first = next((r for r in (profile or {}).get("syscalls") or [] if name in r.get("names", [])), None)
        assert open_reaches_file(flags) or (first is not None and first.get("args")), (name, oct(flags))
        return
    assert not open_reaches_file(flags), f"{name} {oct(flags)} can reach a file but is not trapped"
    got = 0 if action in ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG") else KILL if "KILL" in action else err
    if action == "SCMP_ACT_ERRNO" and err is None:
        got = errno.EPERM
    assert got == expected, (name, oct(flags), action, err, expected)


@pytest.mark.parametrize("profile", [
    None,
    {"defaultAction": "SCMP_ACT_ALLOW"},
    {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
     "syscalls": [{"names": ["read", "openat", "open"], "action": "SCMP_ACT_ALLOW"}]},
    {"defaultAction": "SCMP_ACT_ALLOW",
     "syscalls": [{"names": ["open"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EROFS},
                  {"names": ["openat"], "action": "SCMP_ACT_KILL"}]},
    {"defaultAction": "SCMP_ACT_ERRNO",  # openat never named: the default decides it
     "syscalls": [{"names": ["open"], "action": "SCMP_ACT_LOG"}]},
    {"defaultAction": "SCMP_ACT_ALLOW",  # conditional first rule: trapped whole, decided by the supervisor
     "syscalls": [{"names": ["openat", "open"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EROFS,
                   "args": [{"index": 2, "value": O_C, "valueTwo": O_C, "op": "SCMP_CMP_MASKED_EQ"}]}]},
])
def test_untrapped_opens_get_exactly_the_users_verdict(profile) -> None:
    out, _ = patch_profile(profile, "/s", "")
    for name in ("open", "openat"):
        for flags in _flag_combinations():
            _assert_kernel_agrees(profile, out, name, flags)


def test_a_conditional_user_rule_keeps_the_whole_syscall_trapped() -> None:
    profile = {"defaultAction": "SCMP_ACT_ALLOW",
               "syscalls": [{"names": ["openat"], "action": "SCMP_ACT_ERRNO", "errnoRet": errno.EROFS,
                             "args": [{"index": 2, "value": O_C, "valueTwo": O_C, "op": "SCMP_CMP_MASKED_EQ"}]}]}
    out, _ = patch_profile(profile, "/s", "")
    plain = [r for r in out["syscalls"] if "openat" in r["names"] and not r.get("args")]
    assert len(plain) == 1 and plain[0]["action"] == "SCMP_ACT_NOTIFY"
    assert all(r["action"] == "SCMP_ACT_NOTIFY" for r in out["syscalls"] if "openat" in r["names"])


def test_flag_classification_matches_the_supervisors() -> None:
    from seccomp.syscalls import PATH_ARGS, open_reaches_file

    for flags in _flag_combinations():
        reaches = not (flags & O_D) and (flags & (O_C | O_E)) != O_C | O_E
        assert open_reaches_file(flags) is reaches, oct(flags)
        assert PATH_ARGS[OPENAT].cannot_touch_file((0, 0, flags, 0, 0, 0)) is not reaches
        assert PATH_ARGS[NUMBERS["open"]].cannot_touch_file((0, flags, 0, 0, 0, 0)) is not reaches
    assert open_reaches_file(os.O_PATH) and open_reaches_file(O_C | os.O_WRONLY)
    assert not open_reaches_file(os.O_RDWR | 0o20000000 | O_D)  # O_TMPFILE
