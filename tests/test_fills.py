"""The fill service answers after the fill, EIO when it fails, and remembers exec chains."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from types import SimpleNamespace

from shim.errors import LazyshimError
from shim.supervisor.decide import Fill
from shim.supervisor.fills import FillService
from tests.supervisor_fakes import FakeNotifier, note


class FakeFiller:
    def __init__(self, fail: set[int] = frozenset()) -> None:
        self.fail = set(fail)
        self.filled: list[int] = []
        self.alone: list[int] = []  # filled without their neighbours
        entries = [SimpleNamespace(name=f"f{i}", size=0) for i in range(8)]
        self.meta = SimpleNamespace(toc=SimpleNamespace(entries=entries))

    def fill(self, idx: int, neighbours: bool = True) -> None:
        if idx in self.fail:
            raise LazyshimError(f"registry gone for f{idx}")
        self.filled.append(idx)
        if not neighbours:
            self.alone.append(idx)


class FakeRoot:
    def __init__(self) -> None:
        self.paths: dict[bytes, tuple] = {}

    def complete(self, recount: bool = True) -> bool:
        return False

    def lookup(self, st):
        return None

    def check_rootfs(self, root_fd: int) -> None:
        pass

    def lookup_path(self, root_fd: int, path: bytes):
        return self.paths.pop(path, None)

    def prefetch_plan(self, everything: bool):
        return []

    def stats(self) -> dict:
        return {"layers": 1}


def _service(tmp_path: Path, root=None) -> tuple[FillService, list[str]]:
    logs: list[str] = []
    svc = FillService(root or FakeRoot(), logs.append, stats_path=tmp_path / "stats.json", workers=2)
    svc.record = (tmp_path / "record").open("a")
    return svc, logs


def test_answers_after_the_fill_and_eio_when_it_fails(tmp_path: Path) -> None:
    svc, logs = _service(tmp_path)
    filler = FakeFiller(fail={2})
    notifier = FakeNotifier([])
    svc.submit(notifier, note("openat", nid=1), Fill((filler, 1)))
    svc.submit(notifier, note("openat", nid=2), Fill((filler, 2)))
    assert notifier.wait_for(2) == {1: "continue", 2: errno.EIO}
    svc.pool.shutdown(wait=True)
    assert filler.filled == [1]
    assert svc.stats.fills == 1 and svc.stats.fill_errors == 1
    assert any("fill failed" in line and "registry gone" in line for line in logs)
    svc.record.close()
    assert (tmp_path / "record").read_text() == "/f1\n"


def test_exec_chain_is_filled_once_then_remembered(tmp_path: Path) -> None:
    root = FakeRoot()
    filler = FakeFiller()
    script = tmp_path / "tool"
    interp = tmp_path / "interp"
    interp.write_bytes(b"plain\n")
    script.write_bytes(b"#!" + str(interp).encode() + b"\n")
    root.paths[str(script).encode()] = (filler, 0)
    svc, _ = _service(tmp_path, root)
    notifier = FakeNotifier([])
    key = ("tool", 1)
    # The task is this process (its root is /): the chain resolves on the host's files.
    n = note("execve", pid=os.getpid(), nid=7)
    svc.submit(notifier, n, Fill(None, exec_path=str(script).encode(), cwd=b"/", chain_key=key))
    assert notifier.wait_for(1) == {7: "continue"}
    svc.pool.shutdown(wait=True)
    assert filler.filled == [0] and svc.exec_chain_filled(key)


def test_relative_interpreters_are_not_remembered(tmp_path: Path) -> None:
    script = tmp_path / "tool"
    script.write_bytes(b"#!interp\n")
    svc, _ = _service(tmp_path)
    fd = os.open("/", os.O_PATH)
    try:
        assert svc.fill_exec_chain(fd, str(script).encode(), str(tmp_path).encode()) is False
        script.write_bytes(b"\x7fELF not really\n")
        assert svc.fill_exec_chain(fd, str(script).encode()) is True
    finally:
        os.close(fd)


def test_prefill_remembers_the_entrypoints_chain(tmp_path: Path) -> None:
    from shim.supervisor.decide import chain_key

    rootfs = tmp_path / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (rootfs / "bin" / "tool").write_bytes(b"#!/bin/interp\n")
    (rootfs / "bin" / "interp").write_bytes(b"plain\n")
    svc, _ = _service(tmp_path)
    svc.prefill(rootfs, [], ["/usr/bin/tool", "/bin/tool"])
    root = os.stat(rootfs)
    assert svc.exec_chain_filled(chain_key(os.stat(rootfs / "bin" / "tool"), (root.st_dev, root.st_ino)))


def test_prefill_asks_for_the_loader_its_cache_and_libc_beside_the_entrypoint_and_no_neighbours(
        tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    lib = rootfs / "usr/lib/x86_64-linux-gnu"
    lib.mkdir(parents=True)
    (rootfs / "etc").mkdir()
    (rootfs / "bin").mkdir()
    for name in ("ld-linux-x86-64.so.2", "libc.so.6"):
        (lib / name).write_bytes(b"\x7fELF")
    (rootfs / "etc/passwd").write_text("root:x:0:0::/:/bin/sh\n")
    (rootfs / "etc/ld.so.cache").write_bytes(b"glibc-ld.so.cache1.1")
    (rootfs / "bin/tool").write_bytes(b"plain\n")
    root, filler = FakeRoot(), FakeFiller()
    root.paths = {b"/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2": (filler, 0),
                  b"/usr/lib/x86_64-linux-gnu/libc.so.6": (filler, 1), b"/etc/passwd": (filler, 2),
                  b"/bin/tool": (filler, 3), b"/etc/ld.so.cache": (filler, 4)}
    svc, _ = _service(tmp_path, root)
    svc.prefill(rootfs, ["/etc/passwd"], ["/bin/tool"])
    svc.pool.shutdown(wait=True)
    assert sorted(filler.filled) == [0, 1, 2, 3, 4]
    assert sorted(filler.alone) == [0, 1, 2, 4]  # named, not missed: their blob neighbours are no hint


class _BlockingFiller(FakeFiller):
    """Holds the fill of one entry until released (a slow entrypoint fetch)."""

    def __init__(self, slow: int) -> None:
        super().__init__()
        self.slow, self.release, self.entered = slow, threading.Event(), threading.Event()

    def fill(self, idx: int, neighbours: bool = True) -> None:
        if idx == self.slow:
            self.entered.set()
            self.release.wait()
        super().fill(idx, neighbours)


def test_prefill_returns_with_passwd_while_the_entrypoint_is_still_filling(tmp_path: Path) -> None:
    """Readiness (runc may start) waits for what runc reads before the filter, not for the
    entrypoint: the container's exec of it waits for that fill itself."""
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\n")
    (rootfs / "bin").mkdir()
    (rootfs / "bin" / "tool").write_bytes(b"plain\n")
    root = FakeRoot()
    filler = _BlockingFiller(slow=1)
    root.paths[b"/etc/passwd"] = (filler, 0)
    root.paths[b"/bin/tool"] = (filler, 1)
    svc, _ = _service(tmp_path, root)
    svc.prefill(rootfs, ["/etc/passwd"], ["/bin/tool"], wait_for_exec=False)
    assert filler.filled == [0]  # passwd is in place when prefill returns
    assert filler.entered.wait(60)  # and the entrypoint's fill is under way, not done
    assert filler.filled == [0]
    filler.release.set()
    svc.pool.shutdown(wait=True)
    for t in [t for t in threading.enumerate() if t.name == "prefill-exec"]:
        t.join()
    assert filler.filled == [0, 1]


class _ByNameRoot(FakeRoot):
    """Finds a placeholder by the file's base name (the host's library dirs vary)."""

    def lookup_path(self, root_fd: int, path: bytes):
        return self.paths.pop(os.path.basename(path), None)


class _WatchedFiller(FakeFiller):
    """Says when it has filled a number of files."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = threading.Condition()

    def fill(self, idx: int, neighbours: bool = True) -> None:
        super().fill(idx, neighbours)
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, count: int) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.filled) >= count, timeout=30)


def test_a_missed_shared_object_has_its_needed_libraries_filled_and_theirs(tmp_path: Path) -> None:
    # The task is this process (its root is /): the libraries are the host's own.
    mod = tmp_path / "_umath.cpython-311-x86_64-linux-gnu.so"
    mod.write_bytes(Path("/usr/bin/python3.11").read_bytes())  # DT_NEEDED libm, libz, libexpat, libc
    root, filler = _ByNameRoot(), _WatchedFiller()
    names = {1: "libm.so.6", 2: "libz.so.1", 3: "libexpat.so.1", 4: "libc.so.6", 5: "ld-linux-x86-64.so.2"}
    for i, base in names.items():
        filler.meta.toc.entries[i].name = f"lib/x86_64-linux-gnu/{base}"
        root.paths[base.encode()] = (filler, i)
    filler.meta.toc.entries[0].name = str(mod).lstrip("/")
    filler.meta.toc.entries[6].name = "etc/hostname"  # not a shared object: nothing more
    svc, logs = _service(tmp_path, root)
    notifier = FakeNotifier([])
    svc.submit(notifier, note("openat", nid=1, pid=os.getpid()), Fill((filler, 0)))
    svc.submit(notifier, note("openat", nid=2, pid=os.getpid()), Fill((filler, 6)))
    assert notifier.wait_for(2) == {1: "continue", 2: "continue"}
    # python3.11's four at once after the answer, then libm's own loader: two levels down.
    assert filler.wait_for(7), filler.filled
    svc.pool.shutdown(wait=True)
    assert sorted(filler.filled) == [0, 1, 2, 3, 4, 5, 6] and not logs
    svc.record.close()
    record = (tmp_path / "record").read_text().split()
    assert sorted(record) == sorted("/" + e.name for e in filler.meta.toc.entries[:7])
    # A second miss of the same object asks for nothing again.
    assert not svc._first_look(filler, 0)
