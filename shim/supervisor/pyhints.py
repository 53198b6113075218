"""Fill the modules a Python module imports as soon as the module has arrived.

A Python start-up is a chain of misses: the interpreter opens a module, runs it, and only
then opens what it imports (traced on pysci: ~150 misses in a row, 40-80 ms apart; on the
weights image ~30, 2 s of a 6.4 s run).  Once a module just missed (or the entrypoint
script) is in place, its top-level import statements (`pyimports`) are resolved the way
the interpreter's path finder would, in the image's own tree, and those modules are filled
side by side, then what they import, and so on.  A guess that is wrong costs one fetch;
every byte is still verified by the fill, and a failure is only logged: the interpreter's
own open asks again.

Cost: the scan runs on a thread of its own, only on files that just arrived (or that a
readahead brought, at most FILLED_HOPS in a row), never on the answer path.
"""

from __future__ import annotations

import heapq
import os
import re
import threading
from collections.abc import Callable

from seccomp.resolve import O_PATH, RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, openat2

from .. import trace
from ..errors import LazyshimError
from .pyimports import MAX_SCAN, Import, bytecode_imports, source_imports

#: Modules filled side by side (threads of their own: on-demand fills never queue behind a guess).
WORKERS = 8
#: Import levels followed from a miss; and how many modules already in place (a readahead's)
#: the walk passes through in a row before it stops.
MAX_LEVELS = 12
FILLED_HOPS = 2
#: Bounds, not tunings: modules looked at, directory listings kept, search roots known.
MAX_SEEN = 8192
MAX_DIRS = 4096
MAX_ROOTS = 32

_STDLIB = re.compile(r"(/.*)?/lib/python3\.(\d+)\Z")
_CACHE_TAG = re.compile(r"cpython-\d+\Z")


def is_python_module(name: str) -> bool:
    return name.endswith((".py", ".pyc"))


class _Dir:
    __slots__ = ("names", "extensions")

    def __init__(self, names: list[str]) -> None:
        self.names = frozenset(names)
        # `_x.cpython-311-x86_64-linux-gnu.so`, `_x.abi3.so`: the path finder tries these first
        self.extensions = {n.split(".", 1)[0]: n for n in names if n.endswith(".so") and "." in n[:-3]}


class ModuleHints:
    """Fills, on threads of its own, what the Python modules that arrive will import next.

    In the order the interpreter will want them: it imports depth first, so every module
    waiting here has a key, the path of import-statement positions from where its walk
    began, and the smallest key goes first (a breadth-first walk fetched a package's
    hundred siblings while the interpreter waited for the next link of one chain).  A walk
    begun by a newer miss goes before older ones: the interpreter is inside that import now."""

    def __init__(self, lookup_path: Callable, fill: Callable, log: Callable[[str], None]) -> None:
        """`lookup_path(root_fd, path)`: the unfilled placeholder there, or None;
        `fill(filler, idx)`: fill it (raises LazyshimError)."""
        self._lookup_path = lookup_path
        self._fill = fill
        self.log = log
        self._queue: list[tuple[tuple[int, ...], str, int, bool]] = []  # a heap, by key
        self._ready = threading.Condition()
        self._workers = 0
        self._walks = 0
        self._busy = 0  # visits in progress
        self._closed = False
        self._lock = threading.Lock()
        self._root_fd = -1
        self.pid = 0  # the task whose root that is (0: the rootfs as the host sees it)
        self._seen: set[str] = set()
        self._dirs: dict[str, _Dir | None] = {}
        self._roots: list[str] = []
        self._seeded = False
        self._seed_lock = threading.Lock()
        self._tag = ""  # the interpreter's cache tag, e.g. cpython-311, from the first .pyc seen
        self.hinted = 0  # modules filled because an importer named them

    # ---- entry points ----------------------------------------------------------------
    def arrived(self, pid: int, name: str) -> None:
        """A file of the image was just filled for task `pid` (`name` without a leading /)."""
        if not is_python_module(name) or not self._has_root(pid=pid):
            return
        self._start("/" + name)

    def arrived_in(self, root_fd: int, path: str) -> None:
        """`path` was just filled inside the rootfs open at `root_fd` (before the container runs)."""
        if not is_python_module(path) or not self._has_root(root_fd=root_fd):
            return
        self._start(path)

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._queue.clear()
            self._ready.notify_all()

    def _start(self, path: str) -> None:
        if self._first(path):
            with self._ready:
                self._walks += 1
                key = (-self._walks,)
            self._push(key, path, 0, False)

    def _push(self, key: tuple[int, ...], path: str, hops: int, fill: bool) -> None:
        with self._ready:
            if self._closed:
                return
            heapq.heappush(self._queue, (key, path, hops, fill))
            if self._workers < WORKERS:
                threading.Thread(target=self._work, daemon=True, name=f"pyhint-{self._workers}").start()
                self._workers += 1
            self._ready.notify_all()  # a worker (wait_idle waits here too)

    def wait_idle(self, timeout: float) -> bool:
        """True once nothing is queued or being visited (within `timeout` seconds)."""
        with self._ready:
            return self._ready.wait_for(lambda: not self._queue and not self._busy, timeout)

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._queue and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
                item = heapq.heappop(self._queue)
                self._busy += 1
            try:
                self._visit(*item)
            finally:
                with self._ready:
                    self._busy -= 1
                    self._ready.notify_all()

    def _has_root(self, pid: int = 0, root_fd: int = -1) -> bool:
        """Keep one view of the container's root (every task's in a plain container)."""
        if self._root_fd >= 0:
            return True
        try:
            if root_fd >= 0:
                fd = os.dup(root_fd)
            else:
                fd = os.open(f"/proc/{pid}/root", O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return False
        with self._lock:
            if self._root_fd < 0:
                self._root_fd, self.pid = fd, pid
                return True
        os.close(fd)
        return True

    def _first(self, path: str) -> bool:
        with self._lock:
            if path in self._seen:
                return False
            if len(self._seen) >= MAX_SEEN:
                return False  # a bound: the walk ends, the opens go on filling themselves
            self._seen.add(path)
            return True

    # ---- the walk --------------------------------------------------------------------
    def _visit(self, key: tuple[int, ...], path: str, hops: int, fill: bool) -> None:
        """Fill `path` if it is still a placeholder (when `fill`), then submit what it imports.
        `key` has one position per import level below where the walk began."""
        try:
            hit = self._lookup_path(self._root_fd, path.encode())
            if hit is not None:
                if not fill:
                    return  # not in place (an unfilled file's bytes are not its own): nothing to read
                if trace.enabled():
                    trace.mark("hint", path[1:])
                self._fill(*hit)
                self.hinted += 1
                hops = 0
            elif fill:
                hops += 1  # in place already (a readahead's, or filled before): pass through a few
                if hops > FILLED_HOPS:
                    return
            if len(key) > MAX_LEVELS:
                return
            for i, target in enumerate(self._targets(path)):
                if self._first(target):
                    self._push((*key, i), target, hops, True)
        except LazyshimError as e:
            self.log(f"prefill of an imported module failed: {e}")
        except OSError:
            return  # unreadable: the interpreter's own opens fill it
        except Exception as e:  # noqa: BLE001 - a guess that went wrong never ends the supervisor
            self.log(f"internal error in the import walk at {path!r}: {e!r}")

    def _targets(self, path: str) -> list[str]:
        head = self._read(path)
        if head is None:
            return []
        pyc = path.endswith(".pyc")
        imports = bytecode_imports(head) if pyc else source_imports(head)
        d, _, base = path.rpartition("/")
        if pyc:
            d = d.removesuffix("/__pycache__")
            tag = base.split(".")[1] if base.count(".") >= 2 else ""
            if not self._tag and _CACHE_TAG.match(tag):
                self._tag = tag
        self._learn_roots(d)
        out: list[str] = []
        for imp in imports:
            out.extend(self._resolve(imp, d))
        return out

    def _read(self, path: str) -> bytes | None:
        try:
            fd = openat2(self._root_fd, path.encode(), os.O_RDONLY | os.O_CLOEXEC,
                         RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        except OSError:
            return None
        try:
            return os.pread(fd, MAX_SCAN, 0)
        finally:
            os.close(fd)

    # ---- the path finder, in the image's tree --------------------------------------
    def _resolve(self, imp: Import, here: str) -> list[str]:
        """The files the interpreter will open for `imp` made in a module of dir `here`."""
        files: list[str] = []
        if imp.level:
            base: str | None = here
            for _ in range(imp.level - 1):
                base = base.rpartition("/")[0] if base else None
            parts = imp.module.split(".") if imp.module else []
        else:
            parts = imp.module.split(".")
            base = None
            for root in list(self._roots):
                f, pkg = self._module_in(root, parts[0])
                if f or pkg:
                    base = root
                    break
        if not base:
            return files
        pkg: str | None = base
        for part in parts:
            f, pkg = self._module_in(pkg, part)
            if f:
                files.append(f)
            if pkg is None:
                return files
        for name in imp.names:  # `from pkg import sub`: a submodule, or only an attribute
            f, _ = self._module_in(pkg, name)
            if f:
                files.append(f)
        return files

    def _module_in(self, d: str, name: str) -> tuple[str | None, str | None]:
        """(file to open, package dir if a package) for module `name` in dir `d`."""
        listing = self._listdir(d)
        if listing is None:
            return None, None
        if name in listing.names:
            sub = self._listdir(f"{d}/{name}")
            if sub is not None:  # a package, or a namespace package (no file of its own)
                return self._module_file(f"{d}/{name}", "__init__", sub), f"{d}/{name}"
        return self._module_file(d, name, listing), None

    def _module_file(self, d: str, name: str, listing: _Dir) -> str | None:
        ext = listing.extensions.get(name)
        if ext is not None:
            return f"{d}/{ext}"
        if name + ".py" in listing.names:
            if self._tag and "__pycache__" in listing.names:
                cache = self._listdir(f"{d}/__pycache__")
                pyc = f"{name}.{self._tag}.pyc"
                if cache is not None and pyc in cache.names:
                    return f"{d}/__pycache__/{pyc}"
            return f"{d}/{name}.py"
        if name + ".pyc" in listing.names:  # a sourceless distribution
            return f"{d}/{name}.pyc"
        return None

    def _listdir(self, d: str) -> _Dir | None:
        try:
            return self._dirs[d]
        except KeyError:
            pass
        try:
            fd = openat2(self._root_fd, d.encode(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                         RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        except OSError:
            listing = None
        else:
            try:
                listing = _Dir(os.listdir(fd))
            except OSError:
                listing = None
            finally:
                os.close(fd)
        if len(self._dirs) >= MAX_DIRS:
            self._dirs.clear()
        self._dirs[d] = listing
        return listing

    def _learn_roots(self, d: str) -> None:
        """Add the search root of a module in dir `d` (the dir above its top package), and on
        the first call the image's standard library dirs: an entrypoint script's imports
        come before the interpreter has missed anything there."""
        if not self._seeded:
            with self._seed_lock:  # every walk waits for it: a root missing is an import not seen
                if not self._seeded:
                    self._seed_roots()
                    self._seeded = True
        root = d
        while root.count("/") > 1:
            listing = self._listdir(root)
            if listing is None or not ({"__init__.py", "__init__.pyc"} & listing.names
                                       or "__init__" in listing.extensions):
                break
            root = root.rpartition("/")[0]
        self._add_root(root)

    def _seed_roots(self) -> None:
        for prefix in ("/usr/lib", "/usr/local/lib"):
            listing = self._listdir(prefix)
            for n in sorted(listing.names if listing else ()):
                stdlib = self._listdir(f"{prefix}/{n}") if _STDLIB.match(f"{prefix}/{n}") else None
                if stdlib is not None and "os.py" in stdlib.names:
                    self._add_root(f"{prefix}/{n}")
                    if not self._tag:  # the cache tag of the interpreter: cpython-311 for python3.11
                        self._tag = "cpython-3" + n.rpartition(".")[2]

    def _add_root(self, root: str) -> None:
        if root in self._roots or len(self._roots) >= MAX_ROOTS:
            return
        with self._lock:
            self._roots.append(root)
        m = _STDLIB.match(root)
        if m:  # the interpreter's own path after its standard library, in its order
            prefix, minor = m.group(1) or "", m.group(2)
            for extra in (f"{root}/lib-dynload", f"/usr/local/lib/python3.{minor}/dist-packages",
                          f"/usr/local/lib/python3.{minor}/site-packages", f"{prefix}/lib/python3/dist-packages",
                          f"{root}/site-packages", f"{root}/dist-packages"):
                if self._listdir(extra) is not None and extra not in self._roots:
                    with self._lock:
                        self._roots.append(extra)
