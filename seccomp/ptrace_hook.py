"""createRuntime hook of the ptrace backend: hand the container's init to the supervisor.

    ptrace_hook.py SOCKET        (the OCI state JSON on stdin, as runc and crun run hooks)

Sends the state to the supervisor's socket and waits for its one-line answer: `ok` once it
has seized the init (then the filter may be installed: its RET_TRACE stops have a tracer),
or an error, printed to stderr with a non-zero exit so that `create` fails with it rather
than a container whose trapped syscalls all fail with ENOSYS.  Standard library only: it
runs with `python -S`, once per container start.
"""

from __future__ import annotations

import socket
import sys

MAX_STATE = 1 << 20
MAX_ANSWER = 4096


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("lazyshim: ptrace hook: usage: ptrace_hook.py SOCKET", file=sys.stderr)
        return 2
    state = sys.stdin.buffer.read(MAX_STATE + 1)
    if len(state) > MAX_STATE:
        print("lazyshim: ptrace hook: container state larger than 1 MiB", file=sys.stderr)
        return 1
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(argv[1])
            s.sendall(state)
            s.shutdown(socket.SHUT_WR)
            answer = b""
            while len(answer) < MAX_ANSWER:
                piece = s.recv(MAX_ANSWER)
                if not piece:
                    break
                answer += piece
    except OSError as e:
        print(f"lazyshim: ptrace hook: supervisor at {argv[1]}: {e.strerror or e}", file=sys.stderr)
        return 1
    line = answer.decode("utf-8", "replace").strip()
    if line == "ok":
        return 0
    print(f"lazyshim: {line or 'the supervisor closed the connection without an answer'}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
