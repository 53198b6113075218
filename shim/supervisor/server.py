"""The per-container supervisor: answer every trapped open/exec, filling placeholders first.

One thread per notify fd receives notifications.  A notification whose file is already
filled (or is not ours) is answered on that thread at once; one that needs a fetch goes
to a worker pool, so a slow fill never stalls opens of files that are already there.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import select
import signal
import socket
import stat
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from seccomp.listener import receive_fd
from seccomp.memory import MemoryReader
from seccomp.notify import Notification, Notifier
from seccomp.resolve import (
    AT_FDCWD,
    O_PATH,
    RESOLVE_IN_ROOT,
    RESOLVE_NO_MAGICLINKS,
    UNRESOLVED,
    RootResolver,
    openat2,
)
from seccomp.syscalls import PATH_ARGS, native_nr, signed32
from seccomp.verdict import KILL, Verdicts

from ..errors import LazyshimError
from ..lazyroot import LazyRoot
from ..store.filler import SYNCER
from .execchain import BINPRM_BUF_SIZE, HEADER_READ, LIBRARY_DIRS, MAX_DEPTH, interpreter, needed_libraries

#: The start-up set (prioritized files) is fetched in requests of up to this size, this many at once.
URGENT_REQUEST = 2 << 20
URGENT_PARALLEL = 4


class Stats:
    __slots__ = ("notifications", "fills", "fill_errors", "fill_seconds", "fill_max")

    def __init__(self) -> None:
        self.notifications = 0
        self.fills = 0
        self.fill_errors = 0
        self.fill_seconds = 0.0
        self.fill_max = 0.0


class Supervisor:
    def __init__(self, root: LazyRoot, verdicts: Verdicts, stats_path: Path | None = None,
                 workers: int = 16, log=None) -> None:
        self.root = root
        self.verdicts = verdicts
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fill")
        self.stats = Stats()
        self.stats_path = stats_path
        self.log = log
        self._active = 0
        self._lock = threading.Lock()
        self.done = threading.Event()
        self._ondemand = 0
        self._last_ondemand = 0.0
        self._started = threading.Event()  # the first notify fd arrived: the container exists
        self.record = None  # a text file: every file filled on demand, in the order of need
        self._idle = threading.Condition()
        self._stats_written = 0.0
        # Once every file is filled, answer at once: no path to read, nothing to resolve.
        self.complete = root.complete()

    # ---- connections -------------------------------------------------------------
    def serve(self, listener: socket.socket) -> None:
        """Accept runtime connections until the last notify fd hangs up."""
        threading.Thread(target=self._accept_loop, args=(listener,), daemon=True).start()
        self.done.wait()
        SYNCER.flush()  # what was filled is marked for the next container
        self.write_stats()

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
        self.add_fd(fd)

    def add_fd(self, fd: int) -> None:
        with self._lock:
            self._active += 1
        self._started.set()
        threading.Thread(target=self._notify_loop, args=(fd,), daemon=True).start()

    def _fd_closed(self) -> None:
        with self._lock:
            self._active -= 1
            last = self._active == 0
        if last:
            self.done.set()

    # ---- the hot path ---------------------------------------------------------
    def _notify_loop(self, fd: int) -> None:
        notifier = Notifier(fd)
        # Caches of fds are owned by this thread alone: a closed-and-reused fd number seen
        # by another thread could otherwise read the wrong task's memory.
        mem = MemoryReader()
        resolver = RootResolver()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        try:
            while True:
                events = poller.poll()
                if not events:
                    continue
                ev = events[0][1]
                if ev & select.POLLIN:
                    n = notifier.recv()
                    if n is not None:
                        self._handle(notifier, n, mem, resolver)
                    continue
                if ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    break
        finally:
            mem.forget_all()
            resolver.forget_all()
            notifier.close()
            self._fd_closed()

    def _handle(self, notifier: Notifier, n: Notification, mem: MemoryReader, resolver: RootResolver) -> None:
        self.stats.notifications += 1
        nr = native_nr(n.arch, n.nr)
        if nr is None:  # not one of ours under any ABI we know: the kernel's own answer
            notifier.fail(n.id, errno.ENOSYS)
            return
        n.nr = nr
        spec = PATH_ARGS.get(nr)
        if spec is None or self.complete:
            self._answer(notifier, n)
            return
        path = mem.read_cstring(n.pid, n.args[spec.path])
        if path is None:
            self._answer(notifier, n)
            return
        dirfd = signed32(n.args[spec.dirfd]) if spec.dirfd is not None else AT_FDCWD
        st = resolver.stat(n.pid, dirfd, path, spec.follows(n.args))
        if st is UNRESOLVED:
            # Through another task's /proc/PID/root or the like: it could reach a placeholder
            # we cannot identify, and serving its zeros would be silent corruption.
            notifier.fail(n.id, errno.EACCES)
            return
        hit = self.root.lookup(st) if st is not None and st.st_size else None
        if hit is None and not (spec.exec and st is not None and stat.S_ISREG(st.st_mode)):
            self._answer(notifier, n)
            return
        full = resolver.absolute(n.pid, dirfd, path) if spec.exec else None
        cwd = resolver.absolute(n.pid, AT_FDCWD, b"") if spec.exec else None
        # Needs work that may block on the network: leave this thread free.
        self.pool.submit(self._slow, notifier, n, hit, full, cwd or b"/")

    def _slow(self, notifier: Notifier, n: Notification, hit, exec_path: bytes | None, cwd: bytes) -> None:
        path = exec_path or b"?"
        try:
            if hit is not None:
                self._fill(*hit)
            if exec_path is not None:
                self._fill_interpreters(n.pid, exec_path, cwd)
        except LazyshimError as e:
            self._log(f"fill failed for pid {n.pid} {path!r}: {e}")
            if notifier.id_valid(n.id):
                notifier.fail(n.id, errno.EIO)
            return
        except Exception as e:  # never leave the target hanging
            self._log(f"internal error for {path!r}: {e!r}")
            notifier.fail(n.id, errno.EIO)
            return
        self._answer(notifier, n)

    def prefill(self, rootfs: Path, paths: list[str], exec_candidates: list[str]) -> None:
        """Fill files before the container starts (runc reads some before the filter), and
        the entrypoint: the first of its candidate paths that exists, with its interpreters."""
        root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        pending = []
        try:
            for p in paths:  # fetched alongside the exec chain, not one round trip after another
                hit = self.root.lookup_path(root_fd, p.encode())
                if hit is not None:
                    pending.append(self.pool.submit(self._fill, *hit))
            for p in exec_candidates:
                try:
                    os.close(openat2(root_fd, p.encode(), O_PATH, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS))
                except OSError:
                    continue
                self.fill_exec_chain(root_fd, p.encode())
                libraries = self._prefill_libraries(root_fd, p.encode())
                break
            else:
                libraries = []
            for f in pending:
                f.result()  # re-raises a failed fill
            for f in libraries:
                try:
                    f.result()
                except LazyshimError as e:  # the loader's own open will retry it, and report
                    self._log(f"prefill of a library failed: {e}")
        finally:
            os.close(root_fd)

    def _prefill_libraries(self, root_fd: int, path: bytes) -> list:
        """Start filling the shared libraries the entrypoint's ELF (after any #! hops) names in
        DT_NEEDED, found in the image's standard library dirs, all at once: otherwise the
        loader opens them one miss after another right after the first execve."""
        names: list[bytes] = []
        for _ in range(MAX_DEPTH):
            try:
                fd = openat2(root_fd, path, os.O_RDONLY, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
            except OSError:
                return []
            try:
                head = os.pread(fd, BINPRM_BUF_SIZE, 0)
                if not head.startswith(b"#!"):
                    names = needed_libraries(functools.partial(_pread_at, fd))
                    break
            finally:
                os.close(fd)
            found = interpreter(head)
            if found is None or not found[0].startswith(b"/"):
                return []
            path = found[0]
        pending = []
        for name in names:
            for d in LIBRARY_DIRS:
                lib = d + b"/" + name
                try:
                    os.close(openat2(root_fd, lib, O_PATH, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS))
                except OSError:
                    continue
                hit = self.root.lookup_path(root_fd, lib)
                if hit is not None:
                    pending.append(self.pool.submit(self._fill, *hit))
                break
        return pending

    def _answer(self, notifier: Notifier, n: Notification) -> None:
        err = self.verdicts.errno_for(n.nr, n.args)
        if err == KILL:
            # The original profile kills the caller; ours cannot, so we do.
            if notifier.id_valid(n.id):  # the pid is still the caller's
                try:
                    os.kill(n.pid, signal.SIGKILL)
                except OSError:
                    pass
            notifier.fail(n.id, errno.EPERM)
        elif err:
            notifier.fail(n.id, err)
        else:
            notifier.allow(n.id)

    def _fill(self, filler, idx: int) -> None:
        t0 = time.monotonic()
        with self._idle:
            self._ondemand += 1
        try:
            filler.fill(idx)
        except LazyshimError:
            self.stats.fill_errors += 1
            raise
        finally:
            with self._idle:
                self._ondemand -= 1
                self._last_ondemand = time.monotonic()
                if not self._ondemand:
                    self._idle.notify_all()
        dt = time.monotonic() - t0
        if self.record is not None:
            with self._lock:
                self.record.write("/" + filler.meta.toc.entries[idx].name + "\n")
                self.record.flush()
        self.stats.fills += 1
        self.stats.fill_seconds += dt
        self.stats.fill_max = max(self.stats.fill_max, dt)
        if t0 - self._stats_written > 0.2:
            self._stats_written = t0
            self.write_stats()

    # ---- background fetching ------------------------------------------------
    def start_background(self, everything: bool) -> None:
        """Fill the prioritized files (and, if `everything`, the rest) without being asked,
        one modest range request at a time, always after any on-demand fill."""
        plan = self.root.prefetch_plan(everything)
        if plan:
            threading.Thread(target=self._background, args=(plan,), daemon=True, name="prefetch").start()

    def _background(self, plan) -> None:
        t0 = time.monotonic()
        failed = 0
        for filler, indices, urgent in plan:
            if not urgent and not self._started.is_set():
                self._started.wait()  # the rest only once the container runs, after its first burst
                self._last_ondemand = time.monotonic()
            if urgent:  # the start-up set: large requests, several at once, beside on-demand fills
                failed += filler.prefetch(indices, lambda: None, max_request=URGENT_REQUEST,
                                          parallel=URGENT_PARALLEL)
            else:  # the rest: modest requests, so an on-demand fill never waits long behind one
                failed += filler.prefetch(indices, self._wait_for_quiet)
        self._log(f"background fetch done in {time.monotonic() - t0:.2f}s ({failed} files failed)")
        self.complete = self.root.complete()
        self.write_stats()

    #: The rest of the image waits until the workload has not needed a fill for this long:
    #: a start-up burst of opens should have the link to itself.
    QUIET = 0.25

    def _wait_for_quiet(self) -> None:
        with self._idle:
            while True:
                self._idle.wait_for(lambda: self._ondemand == 0)
                left = self._last_ondemand + self.QUIET - time.monotonic()
                if left <= 0:
                    return
                self._idle.wait(left)

    def _fill_interpreters(self, pid: int, full: bytes, cwd: bytes) -> None:
        try:
            root_fd = os.open(f"/proc/{pid}/root", O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return  # the task is gone
        try:
            self.fill_exec_chain(root_fd, full, cwd)
        finally:
            os.close(root_fd)

    def fill_exec_chain(self, root_fd: int, full: bytes, cwd: bytes = b"/") -> None:
        """Fill an executable and the ELF/#! interpreter chain the kernel will open itself."""
        for _ in range(MAX_DEPTH):
            hit = self.root.lookup_path(root_fd, full)
            if hit is not None:
                self._fill(*hit)
            try:
                fd = openat2(root_fd, full, os.O_RDONLY, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
            except OSError:
                return  # nothing there: the kernel will report it itself
            try:
                head = os.pread(fd, HEADER_READ, 0)
                found = interpreter(head)
                if found is not None and found[1]:
                    head = os.pread(fd, found[1], 0)
                    found = interpreter(head)
            finally:
                os.close(fd)
            if found is None or not found[0]:
                return
            interp = found[0]
            full = interp if interp.startswith(b"/") else cwd.rstrip(b"/") + b"/" + interp

    def stats_doc(self) -> dict:
        s = self.stats
        return {
            "notifications": s.notifications, "fills": s.fills, "fill_errors": s.fill_errors,
            "fill_seconds": round(s.fill_seconds, 6), "fill_max_seconds": round(s.fill_max, 6),
            "complete": self.complete, **self.root.stats(),
        }

    def write_stats(self) -> None:
        if self.stats_path is None:
            return
        tmp = self.stats_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.stats_doc()))
            os.replace(tmp, self.stats_path)
        except OSError:
            pass

    def serve_control(self, path: Path) -> None:
        """Answer `lazyshim stats` on a socket of our own: connect, read one JSON document."""
        try:
            path.unlink(missing_ok=True)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
            sock.listen(4)
        except OSError as e:
            self._log(f"no control socket: {e}")
            return

        def loop() -> None:
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                with conn:
                    try:
                        conn.sendall(json.dumps(self.stats_doc()).encode())
                    except OSError:
                        pass

        threading.Thread(target=loop, daemon=True, name="control").start()

    def _log(self, msg: str) -> None:
        if self.log is not None:
            print(f"{time.strftime('%H:%M:%S')} {msg}", file=self.log, flush=True)
        else:
            print(msg, file=sys.stderr, flush=True)


def _pread_at(fd: int, n: int, offset: int) -> bytes:
    return os.pread(fd, n, offset)
