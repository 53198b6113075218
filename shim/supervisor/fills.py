"""The fill service: everything that fetches, off the notify loops' answer path.

It owns the lazy root, the worker pool that runs on-demand fills, the background fetcher
that fills the rest in the workload's quiet spells, the record of what was filled in the
order of need, the exec-chain cache and the statistics (written by a thread of their own,
never before an answer).  A notify loop hands it a Fill verdict; it answers that notification
itself once the fill is done: CONTINUE, or EIO if the fill failed.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from seccomp.notify import Notification, Notifier
from seccomp.resolve import O_PATH, RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, openat2

from .. import trace
from ..errors import LazyshimError
from ..lazyroot import LazyRoot
from ..pacing import HOLD, PARALLEL, QUIET, Pacer, is_quiet, request_size
from ..store.filler import LINK, request_pool
from .decide import Fill, chain_key
from .execchain import BINPRM_BUF_SIZE, HEADER_READ, LIBRARY_DIRS, MAX_DEPTH, interpreter, needed_libraries
from .notify_loop import fail_quietly
from .pyhints import ModuleHints

#: How often the statistics file is rewritten at most while fills happen.
STATS_INTERVAL = 0.2
#: The exec-chain cache forgets everything beyond this many executables (a bound, not a tuning).
MAX_CHAINS = 4096
#: The start-up set (prioritized files) is fetched in requests of up to this size, this many at once.
URGENT_REQUEST = 2 << 20
URGENT_PARALLEL = 4
#: A learned start-up set: files this close share a request; this many requests at once.
STARTUP_GAP = 128 << 10
STARTUP_PARALLEL = 8
#: Asked for before the entrypoint's own DT_NEEDED is known (`FillService._prefill_c_runtime`).
C_RUNTIME = (b"ld-linux-x86-64.so.2", b"libc.so.6")
#: The loader's cache, read by every dynamically linked exec before its first library (traced on py:
#: asked for after python3.11 arrived, it waited 110 ms behind the libraries' fills).
LOADER_CACHE = b"/etc/ld.so.cache"
#: The statistics keep this many on-demand fills, the first ones: where a cold start waited.
FIRST_WAITS = 256
#: A shared object missed on demand has its DT_NEEDED filled at once, theirs too, this deep.
NEEDED_DEPTH = 3
#: Shared objects whose DT_NEEDED were looked at, at most (a bound, not a tuning).
MAX_NEEDED_SEEN = 4096


def is_shared_object(name: str) -> bool:
    """A file the loader maps by name: `libx.so`, `libx.so.1.2`, `_mod.cpython-311-x86_64-linux-gnu.so`."""
    base = name.rsplit("/", 1)[-1]
    return base.endswith(".so") or ".so." in base


class Stats:
    __slots__ = ("notifications", "fills", "fill_errors", "fill_seconds", "fill_max")

    def __init__(self) -> None:
        self.notifications = 0
        self.fills = 0
        self.fill_errors = 0
        self.fill_seconds = 0.0
        self.fill_max = 0.0


class FillService:
    def __init__(self, root: LazyRoot, log: Callable[[str], None], stats_path: Path | None = None,
                 workers: int = 16, restarts: int = 0) -> None:
        self.root = root
        self.restarts = restarts  # how often the keeper restarted a dead supervisor
        self.log = log
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fill")
        self.stats = Stats()
        self.stats_path = stats_path
        self.record = None  # a text file: every file filled on demand, in the order of need
        self.started = threading.Event()  # the first notify fd arrived: the container exists
        # Once every file is filled, answer at once: no path to read, nothing to resolve.  The
        # fillers have just counted: no recount (a stat per file) on the way to readiness.
        self.complete = root.complete(recount=False)
        self.lookup = root.lookup  # (filler, idx) of an unfilled placeholder by stat, else None
        self._chains: set = set()
        self._needed_seen: set[tuple[int, int]] = set()  # (id(filler), idx) whose DT_NEEDED were asked for
        self.hints = ModuleHints(self._lookup_path, self._fill_imported, log)  # what Python modules import
        self._lock = threading.Lock()  # the record file and the exec-chain cache
        self._stats_lock = threading.Lock()
        self._idle = threading.Condition()
        self._ondemand = 0
        # The container's other fetcher (its FUSE layer of big files) sees our on-demand fills here,
        # and we its reads: each background yields to both (`shim.demand`).  None: no other fetcher.
        self.demand = None
        self._last_ondemand = 0.0
        self._stats_dirty = threading.Event()
        self._startup: list[threading.Thread] = []  # a learned start-up set being fetched, per layer
        self._t0 = time.monotonic()
        # (seconds after start, seconds waited, filler, idx) of the first on-demand fills
        self._first_waits: list[tuple[float, float, object, int]] = []
        if stats_path is not None:
            threading.Thread(target=self._stats_writer, daemon=True, name="stats").start()

    # ---- what decide asks (ImageView): `lookup` is the root's own, bound in __init__ ----
    def exec_chain_filled(self, key) -> bool:
        return key in self._chains

    # ---- on demand -------------------------------------------------------------------
    def submit(self, notifier: Notifier, n: Notification, fill: Fill) -> None:
        """Run `fill` on the pool; the notification is answered when it is done."""
        try:
            self.pool.submit(self._run, notifier, n, fill)
        except RuntimeError as e:  # the pool is shut down: still one answer
            self.log(f"fill refused for pid {n.pid}: {e}")
            fail_quietly(notifier, n.id)

    def _run(self, notifier: Notifier, n: Notification, fill: Fill) -> None:
        path = fill.exec_path or b"?"
        filled = None
        try:
            if fill.hit is not None:
                filled = self._fill(*fill.hit)
            if fill.exec_path is not None:
                self._fill_interpreters(n.pid, fill.exec_path, fill.cwd, fill.chain_key)
        except LazyshimError as e:
            self.log(f"fill failed for pid {n.pid} {path!r}: {e}")
            if notifier.id_valid(n.id):
                fail_quietly(notifier, n.id)
            return
        except Exception as e:  # noqa: BLE001 - never leave the target hanging
            self.log(f"internal error for {path!r}: {e!r}")
            fail_quietly(notifier, n.id, errno.EIO)
            return
        try:
            notifier.allow(n.id)
        except OSError as e:
            self.log(f"answer failed for pid {n.pid}: {e}")
        if filled is not None:
            self._recorded(filled)
            if fill.exec_path is None:
                self._fill_needed_of(n.pid, *filled)
                self.hints.arrived(n.pid, filled[0].meta.toc.entries[filled[1]].name)

    def _fill(self, filler, idx: int, neighbours: bool = True):
        """Fill one file; returns (filler, idx) for the record, after the stats are counted."""
        t0 = time.monotonic()
        if trace.enabled():
            trace.mark("fill", f"start {filler.meta.toc.entries[idx].name} {filler.meta.table.size[idx]}")
        with self._idle:
            self._ondemand += 1
            if self._ondemand == 1 and self.demand is not None:
                self.demand.busy()
        try:
            filler.fill(idx, neighbours)
        except LazyshimError:
            self.stats.fill_errors += 1
            raise
        finally:
            with self._idle:
                self._ondemand -= 1
                self._last_ondemand = time.monotonic()
                if not self._ondemand:
                    if self.demand is not None:
                        self.demand.idle(self._last_ondemand)
                    self._idle.notify_all()
        dt = time.monotonic() - t0
        if len(self._first_waits) < FIRST_WAITS:
            self._first_waits.append((t0 - self._t0, dt, filler, idx))
        if trace.enabled():
            trace.mark("fill", f"done {filler.meta.toc.entries[idx].name}")
        s = self.stats
        s.fills += 1
        s.fill_seconds += dt
        s.fill_max = max(s.fill_max, dt)
        self._stats_dirty.set()
        return filler, idx

    def _recorded(self, hit) -> None:
        if self.record is not None:
            filler, idx = hit
            with self._lock:
                self.record.write("/" + filler.meta.toc.entries[idx].name + "\n")
                self.record.flush()

    # ---- exec chains -----------------------------------------------------------------
    def _fill_interpreters(self, pid: int, full: bytes, cwd: bytes, key) -> None:
        try:
            root_fd = os.open(f"/proc/{pid}/root", O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return  # the task is gone
        try:
            cacheable = self.fill_exec_chain(root_fd, full, cwd)
        finally:
            os.close(root_fd)
        if cacheable and key is not None:
            with self._lock:
                if len(self._chains) >= MAX_CHAINS:
                    self._chains.clear()
                self._chains.add(key)

    def fill_exec_chain(self, root_fd: int, full: bytes, cwd: bytes = b"/") -> bool:
        """Fill an executable and the ELF/#! interpreter chain the kernel will open itself.

        True if the chain depends on nothing but the executable and the root (no relative
        interpreter path), so that a later exec of the same file may skip this walk."""
        cacheable = True
        for _ in range(MAX_DEPTH):
            hit = self.root.lookup_path(root_fd, full)
            if hit is not None:
                self._recorded(self._fill(*hit))
            try:
                fd = openat2(root_fd, full, os.O_RDONLY, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
            except OSError:
                return False  # nothing there: the kernel will report it itself
            try:
                head = os.pread(fd, HEADER_READ, 0)
                found = interpreter(head)
                if found is not None and found[1]:
                    head = os.pread(fd, found[1], 0)
                    found = interpreter(head)
            finally:
                os.close(fd)
            if found is None or not found[0]:
                return cacheable
            interp = found[0]
            if not interp.startswith(b"/"):
                cacheable = False
            full = interp if interp.startswith(b"/") else cwd.rstrip(b"/") + b"/" + interp
        return False

    # ---- before start ----------------------------------------------------------------
    def prefill(self, rootfs: Path, paths: list[str], exec_candidates: list[str], wait_for_exec: bool = True) -> None:
        """Fill files before the container starts (runc reads some before the filter), and
        the entrypoint: the first of its candidate paths that exists, with its interpreters
        and libraries.  Without `wait_for_exec` this returns once `paths` are filled and the
        entrypoint's chain goes on filling in the background: the container's own execve
        then waits for the fill in flight (a failure there is its exec's, reported as EIO)."""
        root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        pending = []
        try:
            self.root.check_rootfs(root_fd)  # a rootfs of other trees than ours: refuse, never serve ENOENT
            trace.mark("supervisor", "check_rootfs")
            for p in paths:  # fetched alongside the exec chain, not one round trip after another
                hit = self.root.lookup_path(root_fd, p.encode())
                if hit is not None:  # no readahead: their neighbours would take the link from the chain's
                    pending.append(self.pool.submit(self._fill, *hit, False))
            if wait_for_exec:
                self._prefill_exec(root_fd, exec_candidates)
            elif exec_candidates:
                chain_fd = os.dup(root_fd)
                threading.Thread(target=self._prefill_exec_quietly, args=(chain_fd, exec_candidates),
                                 daemon=True, name="prefill-exec").start()
            for f in pending:
                self._recorded(f.result())  # re-raises a failed fill
        finally:
            os.close(root_fd)

    def _prefill_exec(self, root_fd: int, exec_candidates: list[str]) -> None:
        """Fill the first existing candidate's exec chain, then its libraries (all at once),
        and return after them (their failures only logged: the loader's own open retries
        them, and reports)."""
        runtime = self._prefill_c_runtime(root_fd)
        for p in exec_candidates:
            try:
                os.close(openat2(root_fd, p.encode(), O_PATH, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS))
            except OSError:
                continue
            if self.fill_exec_chain(root_fd, p.encode()):
                self._remember_entrypoint(root_fd, p.encode())
            self.hints.arrived_in(root_fd, p)  # a Python script: its imports, before the interpreter starts
            libraries = self._prefill_libraries(root_fd, p.encode())
            break
        else:
            libraries = []
        for f in [*runtime, *libraries]:
            try:
                self._recorded(f.result())
            except LazyshimError as e:
                self.log(f"prefill of a library failed: {e}")

    def _prefill_exec_quietly(self, root_fd: int, exec_candidates: list[str]) -> None:
        """`_prefill_exec` on a thread of its own (owns `root_fd`): a failure is logged; the
        container's exec asks again and gets its own answer."""
        try:
            self._prefill_exec(root_fd, exec_candidates)
        except Exception as e:  # noqa: BLE001 - a background prefill never ends the supervisor
            self.log(f"prefill of the entrypoint failed: {e}")
        finally:
            os.close(root_fd)
        trace.mark("supervisor", "exec chain prefilled")

    def _prefill_c_runtime(self, root_fd: int) -> list:
        """Start filling the image's dynamic loader, its cache and the C library beside the
        entrypoint: nearly every dynamically linked entrypoint needs all three, and otherwise they wait until the
        entrypoint has arrived and its DT_NEEDED has been read (measured on the py image: the
        libraries' fills began 0.6 s into the start, after a 2.9 MB python3.11).  An image
        without them (static, musl) costs a lookup."""
        pending = []
        hit = self.root.lookup_path(root_fd, LOADER_CACHE)
        if hit is not None:
            pending.append(self.pool.submit(self._fill, *hit, False))
        for name in C_RUNTIME:
            for d in LIBRARY_DIRS:
                try:
                    os.close(openat2(root_fd, d + b"/" + name, O_PATH, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS))
                except OSError:
                    continue
                hit = self.root.lookup_path(root_fd, d + b"/" + name)
                if hit is not None:
                    pending.append(self.pool.submit(self._fill, *hit, False))
                break
        return pending

    def _prefill_libraries(self, root_fd: int, path: bytes) -> list:
        """Start filling the shared libraries an ELF file (the entrypoint after any #! hops, or
        a shared object just missed) names in DT_NEEDED, found in the image's standard library
        dirs, all at once: otherwise the loader opens them one miss after another."""
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

    def _fill_needed_of(self, pid: int, filler, idx: int, depth: int = NEEDED_DEPTH) -> None:
        """After answering a miss of a shared object (a dlopen, or the loader's open of a
        library's own DT_NEEDED): the loader opens its DT_NEEDED next, one miss after another
        (traced on the weights image: numpy's liblapack, then libgfortran, then libgcc_s, 0.5 s
        in a row), so they are filled now, all at once, and theirs once they arrive, `depth`
        levels down.  Never waits for a fill (it runs on the pool its fills run on); a failure
        is only logged: the loader's own open asks again."""
        name = filler.meta.toc.entries[idx].name
        if not is_shared_object(name) or not self._first_look(filler, idx):
            return
        try:
            root_fd = os.open(f"/proc/{pid}/root", O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return  # the task is gone
        try:
            pending = self._prefill_libraries(root_fd, ("/" + name).encode())
        except (OSError, RuntimeError):
            return  # unreadable now, or the pool is shutting down
        finally:
            os.close(root_fd)
        for f in pending:
            f.add_done_callback(functools.partial(self._needed_arrived, pid, depth - 1))

    def _needed_arrived(self, pid: int, depth: int, f) -> None:
        try:
            hit = f.result()
        except LazyshimError as e:
            self.log(f"prefill of a needed library failed: {e}")
            return
        self._recorded(hit)
        if depth > 0:
            try:
                self.pool.submit(self._fill_needed_of, pid, *hit, depth)
            except RuntimeError:
                pass  # the pool is shutting down

    def _lookup_path(self, root_fd: int, path: bytes):
        return self.root.lookup_path(root_fd, path)

    def _fill_imported(self, filler, idx: int) -> None:
        """A module an arrived one imports (`ModuleHints`): asked for by name, no readahead; an
        extension module's DT_NEEDED follow it."""
        self._recorded(self._fill(filler, idx, False))
        self._fill_needed_of(self.hints.pid, filler, idx)

    def _first_look(self, filler, idx: int) -> bool:
        """True the first time a shared object's DT_NEEDED are to be looked at."""
        key = (id(filler), idx)
        with self._lock:
            if key in self._needed_seen:
                return False
            if len(self._needed_seen) >= MAX_NEEDED_SEEN:
                self._needed_seen.clear()
            self._needed_seen.add(key)
            return True

    def _remember_entrypoint(self, root_fd: int, path: bytes) -> None:
        """The container's first execve is of this file, in this root (the rootfs as the host
        sees it is the container's root): its chain is known, so that exec needs no walk."""
        try:
            fd = openat2(root_fd, path, O_PATH, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        except OSError:
            return
        try:
            st, root = os.fstat(fd), os.fstat(root_fd)
        finally:
            os.close(fd)
        if stat.S_ISREG(st.st_mode):
            with self._lock:
                self._chains.add(chain_key(st, (root.st_dev, root.st_ino)))

    # ---- background fetching ---------------------------------------------------------
    def start_background(self, everything: bool) -> None:
        """Fill the prioritized files without being asked, in large requests several at once
        beside on-demand fills; then, if `everything`, the rest, in the workload's quiet spells,
        paced below the measured rate (`shim.pacing`), next to recent misses first."""
        plan = self.root.prefetch_plan(everything)
        if plan:
            threading.Thread(target=self._background, args=(plan,), daemon=True, name="prefetch").start()

    def prefetch_startup(self, plan: list[tuple[object, list[int]]]) -> None:
        """Fill a start-up set learned from an earlier run (a profile; per layer, the files in
        the order they were needed) now, before and beside the prefill, as the prioritized
        files are: large requests, several at once, every layer at once, the request with the
        first needed file first.  Returns once all its files are claimed: the opens (and the prefill)
        that need one wait for its request, never ask again."""
        if not plan:
            return
        claimed = [threading.Event() for _ in plan]
        threads = [threading.Thread(target=self._fetch_startup, args=(filler, indices, ev.set), daemon=True,
                                    name="profile") for (filler, indices), ev in zip(plan, claimed, strict=True)]
        for t in threads:
            t.start()
        for ev, t in zip(claimed, threads, strict=True):
            while not ev.wait(1.0) and t.is_alive():
                pass  # a layer whose thread died before claiming has nothing claimed to wait for
        self._startup = threads

    def _fetch_startup(self, filler, indices: list[int], on_claimed) -> None:
        t0 = time.monotonic()
        try:
            failed = filler.prefetch(indices, lambda: None, gap=STARTUP_GAP, max_request=URGENT_REQUEST,
                                     parallel=STARTUP_PARALLEL, on_claimed=on_claimed, need_order=True)
        except Exception as e:  # noqa: BLE001 - the opens fill what is left themselves
            self.log(f"profile fetch of layer {filler.meta.digest[:19]} failed: {e!r}")
            return
        self.log(f"profile fetch of {len(indices)} files of layer {filler.meta.digest[:19]} done in "
                 f"{time.monotonic() - t0:.2f}s ({failed} failed)")

    def _background(self, plan) -> None:
        t0 = time.monotonic()
        failed = 0
        rest = []
        for filler, indices, urgent in plan:
            if not urgent:
                for t in self._startup:
                    t.join()  # the rest after the start-up set
            if urgent:  # the start-up set: large requests, several at once, beside on-demand fills
                failed += filler.prefetch(indices, lambda: None, max_request=URGENT_REQUEST,
                                          parallel=URGENT_PARALLEL)
            else:
                rest.append((filler, indices))
        if rest:
            self.started.wait()  # the rest only once the container runs: its first opens go first
            failed += self._fetch_rest(rest)
        self.log(f"background fetch done in {time.monotonic() - t0:.2f}s ({failed} files failed)")
        self.complete = self.root.complete()
        self.write_stats()

    def _fetch_rest(self, parts) -> int:
        """Fill every file of `parts` ((filler, indices) each) in the workload's quiet spells,
        never in its way (`shim.pacing`): once no on-demand fill (nor a read of the FUSE layer's,
        `shim.demand`) has run for QUIET, the files
        just past recent misses first, then the rest in blob order, in requests sized by the
        measured rate and paced below it, so that the next miss finds the link nearly free.
        Returns the number of files that failed (they stay unfilled; an open retries them)."""
        todo = []
        for filler, indices in parts:
            allowed = bytearray(len(filler.meta.toc.entries))
            for i in indices:
                allowed[i] = 1
            todo.append((filler, allowed))
        inflight = failed = 0
        pacer = Pacer()

        def run(filler, claimed: list[int]) -> None:
            nonlocal inflight, failed
            n = 0
            try:
                n = filler.fill_claimed(claimed)
            finally:
                with self._idle:
                    inflight -= 1
                    failed += n
                    self._idle.notify_all()  # a slot is free

        pool = request_pool()
        while todo:
            with self._idle:
                while True:  # woken by a freed slot or the end of an on-demand fill; else re-checked
                    now = time.monotonic()
                    wait = pacer.delay(now)
                    last = self._last_ondemand
                    if self.demand is not None:  # the other process's reads: busy counts as just ended
                        last = max(last, min(self.demand.others_last(), now))
                    if not is_quiet(self._ondemand, last, now):
                        wait = max(wait, last + QUIET - now, HOLD)
                    elif inflight >= PARALLEL:
                        wait = HOLD
                    if wait <= 0:
                        break
                    self._idle.wait(wait)
                inflight += 1
            todo.sort(key=lambda t: -t[0].last_miss)  # stable: plan order among layers never missed
            filler, allowed = todo[0]
            size = request_size(LINK.rate())
            claimed, _near = filler.claim_background(allowed, size)
            if claimed:
                pacer.sent(time.monotonic(), size, LINK.rate())
                try:
                    pool.submit(run, filler, claimed)
                    continue
                except RuntimeError:  # the process is ending: the claims must still go
                    filler.release(claimed)
                    todo.clear()
            else:
                todo.pop(0)  # nothing left in it
            with self._idle:
                inflight -= 1
        with self._idle:
            self._idle.wait_for(lambda: inflight == 0)
        return failed

    # ---- durability ------------------------------------------------------------------
    def flush(self) -> None:
        """Mark what was filled in the layers' byte maps (after one flush of the data), for the
        next container and the next supervisor.  A supervisor ends with os._exit (the keeper's
        fork), where no atexit hook runs: it must call this itself."""
        self.root.flush()

    # ---- statistics ------------------------------------------------------------------
    def stats_doc(self) -> dict:
        s = self.stats
        return {
            "notifications": s.notifications, "fills": s.fills, "fill_errors": s.fill_errors,
            "fill_seconds": round(s.fill_seconds, 6), "fill_max_seconds": round(s.fill_max, 6),
            "complete": self.complete, "pid": os.getpid(), "restarts": self.restarts, **self.root.stats(),
            "imports_filled": self.hints.hinted,
            "first_waits": [{"at": round(at, 4), "waited": round(dt, 4), "size": f.meta.toc.entries[i].size,
                             "path": "/" + f.meta.toc.entries[i].name} for at, dt, f, i in self._first_waits[:]],
        }

    def write_stats(self) -> None:
        with self._stats_lock:
            path = self.stats_path
            if path is None:
                return
            tmp = path.with_suffix(".tmp")
            try:
                tmp.write_text(json.dumps(self.stats_doc()))
                os.replace(tmp, path)
            except OSError:
                pass

    def stop_stats(self) -> None:
        """Write no more statistics: the runtime is about to delete the state dir, and a file
        written while it does would keep the dir alive.  Returns after any write in progress."""
        with self._stats_lock:
            self.stats_path = None

    def _stats_writer(self) -> None:
        """Rewrite the statistics file after fills, at most every STATS_INTERVAL."""
        while True:
            self._stats_dirty.wait()
            self._stats_dirty.clear()
            self.write_stats()
            time.sleep(STATS_INTERVAL)  # a rate limit, not a synchronisation


def _pread_at(fd: int, n: int, offset: int) -> bytes:
    return os.pread(fd, n, offset)
