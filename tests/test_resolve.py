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
