"""The ptrace backend's Supervisor.serve: the hook's connections in, one TraceLoop.

The createRuntime hook (seccomp/ptrace_hook.py) and `exec` (runtime/traced_exec.py) send
the pid to trace over the container's socket, one JSON object per connection; each
connection is read by a thread of its own, the tracer thread seizes the pid and the
answer (`ok` or one line of error) goes back before the connection closes.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable

from .ptrace_loop import TraceLoop

MAX_STATE = 1 << 20


def accept_hooks(listener: socket.socket, loop: TraceLoop, log: Callable[[str], None]) -> None:
    """Accept the createRuntime hook's connections (a thread of its own): each sends the
    container state, the tracer thread seizes its pid and the hook gets the answer."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=_hook_connection, args=(conn, loop, log), daemon=True).start()


def _hook_connection(conn: socket.socket, loop: TraceLoop, log: Callable[[str], None]) -> None:
    data = b""
    try:
        while len(data) <= MAX_STATE:
            piece = conn.recv(65536)
            if not piece:
                break
            data += piece
    except OSError:
        conn.close()
        return
    pid = _pid_of(data)

    def reply(line: str) -> None:
        if line != "ok":
            log(f"hook: {line}")
        try:
            conn.sendall(line.encode() + b"\n")
        except OSError:
            pass
        conn.close()

    if pid is None:
        reply("the hook sent no container state with a pid")
        return
    loop.post(("attach", pid, reply))


def _pid_of(data: bytes) -> int | None:
    try:
        state = json.loads(data) if len(data) <= MAX_STATE else None
    except ValueError:
        return None
    pid = state.get("pid") if isinstance(state, dict) else None
    return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None


def serve_traced(sup, listener: socket.socket) -> None:
    """The ptrace backend's Supervisor.serve: trace the container this socket's hook names,
    until its last task is gone; then mark what was filled, as the notify path does."""
    from seccomp.ptrace_tracer import Tracer

    tracer = Tracer()
    tracer.watch_children()
    fills = sup.fills
    loop = TraceLoop(tracer, sup.verdicts, fills, fills.submit, sup._log, counter=fills.stats,
                     on_attach=fills.started.set)
    threading.Thread(target=accept_hooks, args=(listener, loop, sup._log), daemon=True, name="hooks").start()
    try:
        loop.run()
    finally:
        tracer.close()
    fills.flush()
    fills.write_stats()
