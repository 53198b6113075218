"""The per-container supervisor, wired together: connections in, notify loops, fills, control.

Each notify fd the runtime sends gets a thread running a NotifyLoop (receive, decide,
answer); verdicts that need a fetch go to the FillService, whose pool answers them when the
file is in place, so a slow fill never stalls opens of files that are already there.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

from seccomp.interrupt import pid_namespace, restart_syscall, waiting_tasks
from seccomp.listener import receive_fd
from seccomp.notify import Notifier
from seccomp.verdict import Verdicts

from ..lazyroot import LazyRoot
from .fills import FillService
from .keeper import Handover
from .notify_loop import NotifyLoop


class Supervisor:
    def __init__(self, root: LazyRoot, verdicts: Verdicts, stats_path: Path | None = None,
                 workers: int = 16, log=None, handover: Handover | None = None) -> None:
        self.log_file = log
        self.verdicts = verdicts
        self.handover = handover
        self.fills = FillService(root, self._log, stats_path=stats_path, workers=workers,
                                 restarts=handover.restarts if handover else 0)
        self.learner = None  # a learning.Learner: what this run needs becomes the image's profile
        self.done = threading.Event()
        self._active = 0
        self._lock = threading.Lock()

    def resume(self) -> None:
        """Serve the notify fds a dead predecessor left, after making the syscalls it had
        received but not answered ask again (they would wait forever otherwise)."""
        assert self.handover is not None
        fds = self.handover.fds
        namespaces = {ns for ns in fds.values() if ns}
        restarted = 0
        for tid in waiting_tasks(namespaces) if namespaces else ():
            restarted += restart_syscall(tid)
        self._log(f"restart {self.handover.restarts}: took over {len(fds)} notify fds, "
                  f"restarted {restarted} waiting syscalls")
        for fd in fds:
            self.add_fd(fd)

    # What __main__ configures, kept on the wiring so its command line stays as it is.
    @property
    def record(self):
        return self.fills.record

    @record.setter
    def record(self, f) -> None:
        self.fills.record = f

    def prefill(self, rootfs: Path, paths: list[str], exec_candidates: list[str], wait_for_exec: bool = True) -> None:
        self.fills.prefill(rootfs, paths, exec_candidates, wait_for_exec)

    def start_background(self, everything: bool) -> None:
        self.fills.start_background(everything)

    # ---- connections -------------------------------------------------------------
    def serve(self, listener: socket.socket) -> None:
        """Accept runtime connections until the last notify fd hangs up."""
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True).start()
        self.done.wait()
        self.finish()
        self.fills.flush()  # what was filled is marked for the next container
        self.fills.write_stats()

    def finish(self, stopping: bool = False) -> None:
        """Write what must outlive this process and is not on disk yet: the learned profile.
        `stopping`: the runtime stops us next and deletes the state dir; write nothing there."""
        if self.learner is not None:
            self.learner.save(cut_short=self.fills.complete)
        if stopping:
            self.fills.stop_stats()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        with conn:
            try:
                fd, _state = receive_fd(conn)
            except OSError:
                return
        if fd is None:
            return
        if self.handover is not None:
            pid = _state.get("pid") if isinstance(_state, dict) else None
            self.handover.announce(fd, pid_namespace(pid) if isinstance(pid, int) and pid > 0 else None)
        self.add_fd(fd)

    def add_fd(self, fd: int) -> None:
        with self._lock:
            self._active += 1
        if not self.fills.started.is_set():
            from ..trace import mark

            mark("supervisor", "first notify fd")
        self.fills.started.set()
        fills = self.fills
        loop = NotifyLoop(Notifier(fd), self.verdicts, fills, fills.submit, self._log, counter=fills.stats)
        threading.Thread(target=self._run_loop, args=(loop,), daemon=True, name=f"notify-{fd}").start()

    def _run_loop(self, loop: NotifyLoop) -> None:
        try:
            loop.run()
        finally:
            with self._lock:
                self._active -= 1
                last = self._active == 0
            if last:
                self.done.set()

    # ---- control -------------------------------------------------------------------
    def serve_control(self, path: Path) -> None:
        """Answer `lazyshim stats` on a socket of our own (connect, read one JSON document), and
        the runtime's "finish" before it stops us on another (connect, read "done" once the
        profile is written)."""
        from . import control

        def stats() -> bytes:
            return json.dumps(self.fills.stats_doc()).encode()

        def finish() -> bytes:
            self.finish(stopping=True)
            return b"done"

        for name, answer in ((path.name, stats), (control.FINISH, finish)):
            try:
                sock = control.bind(path.with_name(name))
            except OSError as e:
                self._log(f"no control socket {name}: {e}")
                continue
            threading.Thread(target=self._control_loop, args=(sock, answer), daemon=True, name="control").start()

    def _control_loop(self, sock: socket.socket, answer) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(answer())
                except OSError:
                    pass

    def _log(self, msg: str) -> None:
        if self.log_file is not None:
            print(f"{time.strftime('%H:%M:%S')} {msg}", file=self.log_file, flush=True)
        else:
            print(msg, file=sys.stderr, flush=True)
