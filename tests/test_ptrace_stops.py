"""The ptrace backend's decoding (wait statuses, syscall info, registers), its profile and
hook, and the choice of backend: all without a tracee."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest

from seccomp import ptrace_hook
from seccomp.ptrace_profile import TRACE, add_hook, trace_profile, uses_trace
from seccomp.ptrace_stops import (
    EXEC,
    GONE,
    GROUP_STOP,
    NEW_TASK,
    PTRACE_EVENT_CLONE,
    PTRACE_EVENT_EXEC,
    PTRACE_EVENT_FORK,
    PTRACE_EVENT_SECCOMP,
    PTRACE_EVENT_STOP,
    PTRACE_SYSCALL_INFO_SECCOMP,
    RESUME,
    SECCOMP,
    SIGNAL,
    SYSCALL_INFO,
    SYSCALL_INFO_SIZE,
    TRACE_MARK,
    classify,
    decode_regs,
    decode_syscall_info,
    skip_with_errno,
    tracer_of,
)
from seccomp.syscalls import AUDIT_ARCH_I386, AUDIT_ARCH_X86_64, NUMBERS, TRAPPED_NAMES
from seccomp.verdict import patch_profile
from shim.errors import LazyshimError
from shim.supervisor.ptrace_server import _pid_of


def stopped(sig: int, event: int = 0) -> int:
    """A waitpid status as the kernel builds it for a ptrace stop."""
    return ((event << 16) | (sig << 8)) | 0x7F


def test_wait_statuses_are_classified() -> None:
    assert classify(stopped(signal.SIGTRAP, PTRACE_EVENT_SECCOMP)) == (SECCOMP, 0)
    assert classify(stopped(signal.SIGTRAP, PTRACE_EVENT_EXEC)) == (EXEC, 0)
    assert classify(stopped(signal.SIGTRAP, PTRACE_EVENT_CLONE)) == (NEW_TASK, 0)
    assert classify(stopped(signal.SIGTRAP, PTRACE_EVENT_FORK)) == (NEW_TASK, 0)
    # A new tracee's first stop under PTRACE_SEIZE, and a SIGCONT notification: resume.
    assert classify(stopped(signal.SIGTRAP, PTRACE_EVENT_STOP)) == (RESUME, 0)
    assert classify(stopped(signal.SIGSTOP, PTRACE_EVENT_STOP)) == (GROUP_STOP, signal.SIGSTOP)
    assert classify(stopped(signal.SIGTSTP, PTRACE_EVENT_STOP)) == (GROUP_STOP, signal.SIGTSTP)
    # A signal on its way to the task: delivered, also a plain SIGTRAP.
    assert classify(stopped(signal.SIGCHLD)) == (SIGNAL, signal.SIGCHLD)
    assert classify(stopped(signal.SIGTRAP)) == (SIGNAL, signal.SIGTRAP)
    assert classify(0) == (GONE, 0)  # exit 0
    assert classify(signal.SIGKILL) == (GONE, 0)  # killed
    assert classify(stopped(signal.SIGTRAP, 99)) == (RESUME, 0)  # never left stopped


def test_syscall_info_is_decoded_and_other_stops_refused() -> None:
    assert SYSCALL_INFO.size <= SYSCALL_INFO_SIZE
    args = (0xFFFFFF9C, 0x7FFD0000, 0o2000000, 0, 0, 0)
    buf = bytearray(SYSCALL_INFO_SIZE)
    SYSCALL_INFO.pack_into(buf, 0, PTRACE_SYSCALL_INFO_SECCOMP, AUDIT_ARCH_X86_64, 0x401000, 0x7FFE0000,
                           NUMBERS["openat"], *args, TRACE_MARK)
    assert decode_syscall_info(buf) == (AUDIT_ARCH_X86_64, NUMBERS["openat"], args, TRACE_MARK)
    SYSCALL_INFO.pack_into(buf, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)  # op NONE
    assert decode_syscall_info(buf) is None


def _regs(**kw) -> SimpleNamespace:
    base = dict.fromkeys(("orig_rax", "rax", "rdi", "rsi", "rdx", "r10", "r8", "r9", "rbx", "rcx", "rbp"), 0)
    base["cs"] = 0x33
    base.update(kw)
    return SimpleNamespace(**base)


def test_registers_give_the_syscall_of_a_64_and_a_32_bit_task() -> None:
    r = _regs(orig_rax=NUMBERS["openat"], rdi=1, rsi=2, rdx=3, r10=4, r8=5, r9=6)
    assert decode_regs(r) == (AUDIT_ARCH_X86_64, NUMBERS["openat"], (1, 2, 3, 4, 5, 6))
    # i386: open is 5, its arguments sit in ebx, ecx, edx, esi, edi, ebp (upper halves ignored).
    r = _regs(cs=0x23, orig_rax=5, rbx=(1 << 32) | 11, rcx=12, rdx=13, rsi=14, rdi=15, rbp=16)
    assert decode_regs(r) == (AUDIT_ARCH_I386, 5, (11, 12, 13, 14, 15, 16))


def test_a_skipped_syscall_returns_minus_errno() -> None:
    r = _regs(orig_rax=NUMBERS["openat"], rax=(-errno.ENOSYS) & (2**64 - 1))
    skip_with_errno(r, errno.EIO)
    assert r.orig_rax == 2**64 - 1  # -1: not run at all
    assert r.rax == 2**64 - errno.EIO


def test_tracer_of_reads_proc_status() -> None:
    assert tracer_of(os.getpid()) == 0 or isinstance(tracer_of(os.getpid()), int)
    assert tracer_of(2**22 + 12345) == 0  # no such pid


PODMAN_LIKE = {
    "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
    "architectures": ["SCMP_ARCH_X86_64"],
    "syscalls": [{"names": ["openat", "read", "execve", "exit_group"], "action": "SCMP_ACT_ALLOW"},
                 {"names": ["chmod"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1},
                 {"names": ["ptrace"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
}


def test_the_trace_profile_traps_what_notify_traps_and_widens_nothing() -> None:
    out, verdicts = trace_profile(PODMAN_LIKE)
    notify_out, notify_verdicts = patch_profile(PODMAN_LIKE, "/x.sock")
    assert "listenerPath" not in out and "listenerMetadata" not in out
    assert out["defaultAction"] == "SCMP_ACT_ERRNO" and out["defaultErrnoRet"] == 38
    trace = [r for r in out["syscalls"] if r["action"] == TRACE]
    # Every rule notification would trap (the whole syscalls and the open flag conditions) traces.
    notify_rules = [r for r in notify_out["syscalls"] if r["action"] == "SCMP_ACT_NOTIFY"]
    assert trace == [dict(r, action=TRACE, errnoRet=TRACE_MARK) for r in notify_rules]
    assert {n for r in trace for n in r["names"]} == set(TRAPPED_NAMES)
    allowed = {n for r in out["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]}
    conditional = {n for r in trace if r.get("args") for n in r["names"]}  # opens by their flags
    assert allowed - conditional == {"read", "exit_group"}, \
        "the syscalls trapped whole leave the allow rule: TRACE must see them"
    assert verdicts.to_json() == notify_verdicts.to_json()
    assert verdicts.errno_for(NUMBERS["chmod"], (0,) * 6) == 1
    assert not any(r["action"] == "SCMP_ACT_NOTIFY" for r in out["syscalls"])
    assert PODMAN_LIKE["syscalls"][0]["names"][0] == "openat", "the caller's profile is not modified"


def test_profiles_with_a_tracer_of_their_own_are_recognised() -> None:
    assert uses_trace({"defaultAction": TRACE})
    assert uses_trace({"syscalls": [{"names": ["kill"], "action": TRACE}]})
    assert not uses_trace(PODMAN_LIKE)
    assert not uses_trace({"syscalls": "nonsense"}) and not uses_trace(None) and not uses_trace([])


def test_the_hook_is_appended_after_the_users_own() -> None:
    config = {"hooks": {"createRuntime": [{"path": "/bin/true"}]}}
    add_hook(config, "/run/x.sock")
    hooks = config["hooks"]["createRuntime"]
    assert hooks[0] == {"path": "/bin/true"}
    assert hooks[1]["path"] == sys.executable and hooks[1]["args"][-1] == "/run/x.sock"
    assert os.path.isabs(hooks[1]["args"][2])


def test_only_a_positive_integer_pid_is_taken_from_the_hooks_state() -> None:
    assert _pid_of(b'{"ociVersion": "1.0.2", "id": "c", "pid": 4242}') == 4242
    for bad in (b'{"pid": true}', b'{"pid": -1}', b'{"pid": "12"}', b"[]", b"not json", b"", b'{"pid": 0}'):
        assert _pid_of(bad) is None, bad


def _serve_once(path: str, answer: bytes, got: list[bytes]) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        data = b""
        while piece := conn.recv(4096):
            data += piece
        got.append(data)
        conn.sendall(answer)
        conn.close()
        srv.close()

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("answer, rc", [(b"ok\n", 0), (b"cannot trace the container's init (pid 7): EPERM\n", 1),
                                        (b"", 1)])
def test_the_hook_passes_the_state_on_and_exits_by_the_answer(tmp_path, answer: bytes, rc: int) -> None:
    sock = str(tmp_path / "s.sock")
    got: list[bytes] = []
    t = _serve_once(sock, answer, got)
    p = subprocess.run([sys.executable, "-S", ptrace_hook.__file__, sock], input=b'{"pid": 7}',
                       capture_output=True, timeout=60)
    t.join()
    assert got == [b'{"pid": 7}']
    assert p.returncode == rc
    if rc:
        assert p.stderr.decode().startswith("lazyshim: ") and p.stderr.decode().count("\n") == 1


def test_the_hook_reports_a_missing_supervisor_in_one_line(tmp_path) -> None:
    p = subprocess.run([sys.executable, "-S", ptrace_hook.__file__, str(tmp_path / "none.sock")], input=b"{}",
                       capture_output=True, timeout=60)
    assert p.returncode == 1 and p.stderr.decode().count("\n") == 1 and "lazyshim: ptrace hook" in p.stderr.decode()


def test_the_trap_setting_is_checked(monkeypatch) -> None:
    from runtime import trap

    monkeypatch.setenv("LAZYSHIM_TRAP", "strace")
    with pytest.raises(LazyshimError, match="LAZYSHIM_TRAP"):
        trap.choose("/bin/false")
    monkeypatch.setenv("LAZYSHIM_TRAP", "ptrace")
    assert trap.choose("/nonexistent/runc") == "ptrace"  # forced: no probe
    monkeypatch.setenv("LAZYSHIM_TRAP", "notify")
    assert trap.choose("/nonexistent/runc") == "notify"


def _fake_delegate(tmp_path, name: str, script: str) -> str:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return str(path)


def test_auto_asks_the_delegates_features(tmp_path, monkeypatch) -> None:
    from runtime import trap

    monkeypatch.setenv("LAZYSHIM_TRAP", "auto")
    monkeypatch.setattr(trap, "kernel_notifies", lambda: True)
    with_notify = _fake_delegate(tmp_path, "runc-a", """echo '{"linux": {"seccomp": {"enabled": true,
        "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_NOTIFY", "SCMP_ACT_TRACE"]}}}'""")
    without = _fake_delegate(tmp_path, "runc-b", """echo '{"linux": {"seccomp": {"actions": ["SCMP_ACT_TRACE"]}}}'""")
    old_runc = _fake_delegate(tmp_path, "runc-c", "echo 'unknown command features' >&2; exit 1")
    old_crun = _fake_delegate(tmp_path, "crun", "echo 'unknown command features' >&2; exit 1")
    garbage = _fake_delegate(tmp_path, "runc-d", "echo '[1, 2'")
    assert trap.choose(with_notify) == "notify"
    assert trap.choose(without) == "ptrace"
    assert trap.choose(old_runc) == "ptrace"
    assert trap.choose(old_crun) == "notify"
    assert trap.choose(garbage) == "ptrace"
    monkeypatch.setattr(trap, "kernel_notifies", lambda: False)
    assert trap.choose(with_notify) == "ptrace", "no user_notif in the kernel: ptrace whatever the delegate"


def test_a_second_tracer_rules_the_ptrace_backend_out(monkeypatch) -> None:
    """A task has one tracer: a profile with TRACE rules, or a lazyshim that is itself
    traced, means the image in full and no supervisor, and only under ptrace."""
    from runtime import agent_policy

    monkeypatch.setenv("LAZYSHIM_TRAP", "ptrace")
    own = {"linux": {"seccomp": {"defaultAction": "SCMP_ACT_ALLOW",
                                 "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_TRACE"}]}}}
    assert "SCMP_ACT_TRACE" in agent_policy.foreign_reason(own)
    monkeypatch.setattr("seccomp.ptrace_stops.tracer_of", lambda pid: 4321)
    assert "tracer (pid 4321)" in agent_policy.foreign_reason({})
    monkeypatch.setenv("LAZYSHIM_TRAP", "notify")
    assert agent_policy.foreign_reason(own) is None and agent_policy.foreign_reason({}) is None
