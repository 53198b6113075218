"""The ptrace trap backend with real runc: what only it has (the tracer's choice, its death,
exec as a tracee, the one-tracer rule).  The py and busybox tests of test_lazy_run.py,
test_supervisor.py and test_runtime_cli.py run under both backends."""

from __future__ import annotations

import json
import os
import select
import signal
from pathlib import Path

import pytest

from integration.test_lazy_run import lazyshim
from integration.test_supervisor import HELLO, _Container

PTRACE = {"LAZYSHIM_TRAP": "ptrace"}


@pytest.fixture
def store(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("LAZYSHIM_TRAP", "ptrace")
    return tmp_path / "store"


def _supervisor_pid(name: str) -> int:
    from runtime.stats import stats

    return stats(name)["pid"]


def test_the_forced_backend_traces_the_container_and_info_says_so(store: Path, images: dict[str, str]) -> None:
    assert "supervisor: ptrace (SECCOMP_RET_TRACE)" in lazyshim(store, "info").stdout
    ref = images["busybox:esgz"]
    lazyshim(store, "pull", ref)
    c = _Container(store, ref, "cat /app/hello.txt; echo ready; read x", env=PTRACE)
    try:
        assert HELLO.strip() in c.expect("ready")
        sup = _supervisor_pid(c.name)
        assert b"--trap\0ptrace" in Path(f"/proc/{sup}/cmdline").read_bytes()
        doc = json.loads(lazyshim(store, "stats", c.name).stdout)
        assert doc["fills"] >= 1 and doc["notifications"] >= doc["fills"]
    finally:
        c.send("go")
        c.finish()


def test_exec_runs_as_a_tracee_and_fills_what_it_opens(store: Path, images: dict[str, str]) -> None:
    """No hook runs for exec, and the new process has the container's RET_TRACE filter:
    without the tracer first, its every open would fail with ENOSYS."""
    ref = images["busybox:esgz"]
    lazyshim(store, "pull", ref)
    c = _Container(store, ref, "echo ready; read x", env=PTRACE)
    try:
        c.expect("ready")
        p = lazyshim(store, "exec", c.name, "sh", "-c", "sha256sum /app/random.bin; cat /app/hello.txt; exit 4",
                     check=False)
        assert p.returncode == 4, p.stderr
        from integration.test_supervisor import RANDOM_SHA

        assert p.stdout.splitlines() == [f"{RANDOM_SHA}  /app/random.bin", HELLO.strip()]
    finally:
        c.send("go")
        c.finish()


def test_a_dead_tracer_takes_the_container_with_it_never_a_placeholder(store: Path, images: dict[str, str]) -> None:
    """A tracee whose tracer dies would run its stopped open on the unfilled file: EXITKILL
    kills the container instead, so no reader ever sees a placeholder's bytes."""
    ref = images["busybox:esgz"]
    lazyshim(store, "pull", ref)
    c = _Container(store, ref, "echo ready; read x; cat /app/hello.txt; echo rc=$?", env=PTRACE)
    c.expect("ready")
    sup = os.pidfd_open(_supervisor_pid(c.name))
    try:
        os.kill(_supervisor_pid(c.name), signal.SIGKILL)
        assert select.select([sup], [], [], 60)[0]
    finally:
        os.close(sup)
    c.send("go")
    out = c.finish()
    assert "rc=" not in out and HELLO.strip() not in out, out
    assert c.proc.returncode != 0


def test_a_profile_with_a_tracer_of_its_own_gets_the_image_in_full(store: Path, images: dict[str, str],
                                                                   tmp_path: Path) -> None:
    """A task has one tracer: a profile that sends syscalls to its own keeps them (ENOSYS
    with no such tracer, as under runc), and the image is filled before the start."""
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
               "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_TRACE"}]}
    pfile = tmp_path / "profile.json"
    pfile.write_text(json.dumps(profile))
    ref = images["busybox:esgz"]
    lazyshim(store, "pull", ref)
    p = lazyshim(store, "run", "--rm", "--no-background-fetch", "--security-opt", f"seccomp={pfile}", ref,
                 "sh", "-c", "cat /app/hello.txt; mkdir /d; echo mkdir=$?", check=False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines()[0] == HELLO.strip() and "mkdir=1" in p.stdout
    assert "SCMP_ACT_TRACE" in p.stderr and "one tracer" in p.stderr
    assert all((d / "complete").exists() for d in (store / "layers").iterdir())
