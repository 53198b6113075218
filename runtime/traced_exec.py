"""`exec` into a container supervised by the ptrace backend.

The new process gets the container's seccomp filter, whose trapped syscalls fail with
ENOSYS unless a tracer is attached, and no hook runs for `exec`.  So the delegate's exec
itself becomes a tracee: we fork, the child waits until the container's supervisor has
seized it (asked over the socket the createRuntime hook uses, with the same message: a
JSON object with the pid), then execs the delegate with the original argv; the supervisor
follows it and everything it starts into the container.  We stay as the caller's child in
between: the exit status is the delegate's, and the signals we are sent are passed on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

from shim.errors import LazyshimError

#: What attach writes into a container's state dir: which trap backend it runs under.
TRAP_FILE = "trap"
PROXIED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
           signal.SIGWINCH)


def traced_socket(sdir: str | Path) -> str | None:
    """The supervisor socket to ask, if the container in `sdir` runs under ptrace."""
    sdir = Path(sdir)
    try:
        if (sdir / TRAP_FILE).read_text() != "ptrace":
            return None
    except OSError:
        return None
    from .attach import _socket_path

    return str(_socket_path(sdir))


def run_traced(argv: list[str], sock: str) -> int:
    """Run argv (the delegate's exec) as a tracee of the supervisor at `sock`; its exit
    status as a shell reports it."""
    go_r, go_w = os.pipe()
    sigs = set(PROXIED) | {signal.SIGCHLD}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    pid = os.fork()
    if pid == 0:
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
            os.close(go_w)
            if os.read(go_r, 1) == b"1":  # seized: from here on the filter's stops have a tracer
                os.execv(argv[0], argv)
        finally:
            os._exit(127)
    os.close(go_r)
    try:
        answer = _ask(sock, pid)
        if answer != "ok":
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise LazyshimError(f"exec: {answer}")
        os.write(go_w, b"1")
        os.close(go_w)
        go_w = -1
        return _wait_forwarding(pid, sigs)
    finally:
        if go_w >= 0:
            os.close(go_w)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _ask(sock: str, pid: int) -> str:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.connect(sock)
            s.sendall(json.dumps({"pid": pid}).encode())
            s.shutdown(socket.SHUT_WR)
            answer = b""
            while len(answer) < 4096:
                piece = s.recv(4096)
                if not piece:
                    break
                answer += piece
    except OSError as e:
        return f"the container's supervisor does not answer ({sock}: {e.strerror or e})"
    return answer.decode("utf-8", "replace").strip() or "the supervisor closed the connection without an answer"


def _wait_forwarding(pid: int, sigs: set[int]) -> int:
    while True:
        info = signal.sigwaitinfo(sigs)
        if info.si_signo == signal.SIGCHLD:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                return code if code >= 0 else 128 - code
            continue
        try:
            os.kill(pid, info.si_signo)
        except ProcessLookupError:
            pass
