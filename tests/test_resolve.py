"""The resolver's root bookkeeping: namespace paths made root-relative, no caching while a
chroot is in flight.  Runs on this process's own /proc entries: no container needed."""

from __future__ import annotations

import os

from seccomp.resolve import UNRESOLVED, RootResolver

ME = os.getpid()


def test_namespace_paths_are_made_relative_to_the_tasks_root() -> None:
    r = RootResolver()
    r._paths[ME] = b"/srv/jail"
    assert r._in_root(ME, b"/srv/jail/etc/passwd") == b"/etc/passwd"
    assert r._in_root(ME, b"/srv/jail") == b"/"
    assert r._in_root(ME, b"/srv/jailbreak/x") is UNRESOLVED, "a sibling directory is outside the root"
    assert r._in_root(ME, b"/etc/passwd") is UNRESOLVED
    r._paths[ME] = b""  # the root of the mount namespace: paths pass unchanged
    assert r._in_root(ME, b"/etc/passwd") == b"/etc/passwd"


def test_no_root_is_cached_while_a_chroot_is_in_flight() -> None:
    r = RootResolver()
    assert r.root_id(ME) is not None and ME in r._roots
    r.root_changing(ME)
    assert not r._roots, "what was cached of the old root is dropped"
    assert r.root_id(ME) == (os.stat("/").st_dev, os.stat("/").st_ino)
    assert not r._roots, "our root has not changed yet: nothing may be cached"
    r._changing[ME] = (0, 0)  # as if the chroot had taken effect: the root differs now
    r.root_id(ME)
    assert ME in r._roots and not r._changing
    r.forget_all()


def test_stat_resolves_in_the_tasks_root() -> None:
    r = RootResolver()
    try:
        st = r.stat(ME, -100, b"/etc/hostname")
        assert st is not None and st.st_ino == os.stat("/etc/hostname").st_ino
        assert r.stat(ME, -100, b"/no/such/file") is None
    finally:
        r.forget_all()


def _identity(st):
    return st if st is None or st is UNRESOLVED else (st.st_dev, st.st_ino, st.st_mode)


def test_the_fast_path_answers_as_the_full_walk_does(tmp_path) -> None:
    """`stat` tries one openat2 below the cached root first; whatever it returns must be what
    the walk returns, for files, symlinks followed or not, missing files, relative and /proc
    paths (which the fast path leaves to the walk)."""
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nothing")
    r = RootResolver()
    try:
        r.root_id(ME)  # caches our root: the fast path applies from here on
        assert ME in r._roots
        base = str(tmp_path).encode()
        cases = [(base + b"/file", True), (base + b"/link", True), (base + b"/link", False),
                 (base + b"/dangling", True), (base + b"/dangling", False), (base + b"/nothing", True),
                 (b"/proc/self/root" + base + b"/file", True), (b"etc/hostname", True)]
        for path, follow in cases:
            fast, walked = r.stat(ME, -100, path, follow), r._walk(ME, -100, path, follow)
            assert _identity(fast) == _identity(walked), (path, follow)
        assert r.stat(ME, -100, base + b"/link", False).st_ino == os.lstat(tmp_path / "link").st_ino
        assert r.stat(ME, -100, base + b"/link", True).st_ino == os.stat(tmp_path / "file").st_ino
    finally:
        r.forget_all()


def test_short_and_long_strings_read_alike() -> None:
    """The one-pread fast path and the page-by-page loop give the same strings."""
    import ctypes

    from seccomp.memory import MemoryReader

    m = MemoryReader()
    try:
        for text in (b"/etc/passwd", b"/" + b"a" * 300, b"/" + b"b" * 5000, b""):
            buf = ctypes.create_string_buffer(text)
            got = m.read_cstring(ME, ctypes.addressof(buf))
            assert got == (text if len(text) < 4096 else None), len(text)
            assert m.read_cstring(ME, ctypes.addressof(buf)) == got  # again, with the fd cached
        assert m.read_cstring(ME, 0) is None
    finally:
        m.forget_all()
