"""A small seccomp agent of our own, the runtime-spec way: the user's agent a lazy bundle must keep.

It listens on a unix socket (a profile's `linux.seccomp.listenerPath`), receives the
container state JSON and the notify fd over SCM_RIGHTS (`seccomp.listener.receive_fd`, the
receiving side the supervisor uses too) and answers every notification: `mkdir`/`mkdirat`
"succeed" without creating anything (a result no kernel gives, so a container that sees
`mkdir` return 0 and no directory has been answered by this agent), everything else is
CONTINUEd.  It records the states it received and how many mkdirs it answered.

    python -m integration.seccomp_agent SOCKET      # runs until interrupted
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
from pathlib import Path

from seccomp.listener import receive_fd
from seccomp.notify import Notifier

FAKED = frozenset({83, 258})  # x86_64 mkdir, mkdirat


class SeccompAgent:
    """The agent in threads of the calling process: bound and listening on return from
    `start`, so a runtime that connects right after finds it (no waiting on a timer)."""

    def __init__(self, sock_path: Path) -> None:
        self.path = Path(sock_path)
        self.states: list[dict] = []
        self.faked = 0
        self.continued = 0
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        self._threads: list[threading.Thread] = []
        self._sock: socket.socket | None = None

    def start(self) -> SeccompAgent:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        self._sock.listen(8)
        self._spawn(self._accept_loop)
        return self

    def __enter__(self) -> SeccompAgent:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        for t in self._threads:
            t.join(timeout=10)
        if self._sock is not None:
            self._sock.close()
        self.path.unlink(missing_ok=True)
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept_loop(self) -> None:
        assert self._sock is not None
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._stop_r in events:
                return
            conn, _ = self._sock.accept()
            self._spawn(self._serve_connection, conn)

    def _serve_connection(self, conn: socket.socket) -> None:
        with conn:
            fd, state = receive_fd(conn)
        if fd is None:
            return
        with self._lock:
            self.states.append(state)
        self._answer(Notifier(fd))

    def _answer(self, notifier: Notifier) -> None:
        """Answer until the last target has gone (POLLHUP) or the agent is stopped."""
        poller = select.poll()
        poller.register(notifier.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        try:
            while True:
                events = dict(poller.poll())
                if self._stop_r in events or events.get(notifier.fd, 0) & (select.POLLHUP | select.POLLERR):
                    return
                n = notifier.recv()
                if n is None:
                    continue
                # Counted before answering: once the container has seen the answer, the count is there.
                if n.nr in FAKED:
                    with self._lock:
                        self.faked += 1
                    notifier.fail(n.id, 0)  # error 0, no CONTINUE flag: the call returns 0, does nothing
                else:
                    with self._lock:
                        self.continued += 1
                    notifier.allow(n.id)
        finally:
            notifier.close()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m integration.seccomp_agent SOCKET", file=sys.stderr)
        return 2
    agent = SeccompAgent(Path(argv[0])).start()
    print(f"listening on {agent.path}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
