"""Placeholder trees: what an unprivileged (rootless) store does with device nodes."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from shim.errors import LazyshimError
from shim.formats.toc import Entry, Toc
from shim.store.placeholders import TreeOptions, build_tree


def _no_mknod(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.mknod

    def mknod(path, mode=0o600, device=0, *, dir_fd=None):
        if device != 0:  # whiteouts (0/0) are allowed in a user namespace; real devices are not
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real(path, mode, device, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mknod", mknod)


def test_rootless_skips_dev_nodes_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_mknod(monkeypatch)
    toc = Toc(entries=[
        Entry(name="dev", type="dir", mode=0o755),
        Entry(name="dev/null", type="char", mode=0o666, dev_major=1, dev_minor=3),
        Entry(name="etc", type="dir", mode=0o755),
        Entry(name="etc/hostname", type="reg", size=3, mode=0o644, digest="sha256:" + "0" * 64),
        Entry(name="etc/.wh.gone", type="reg"),
    ])
    opts = TreeOptions(privileged=False)
    inodes = build_tree(toc, tmp_path, opts)
    assert opts.skipped == ["dev/null"], "reported, not silently dropped"
    assert not (tmp_path / "dev/null").exists()
    assert inodes[3] and (tmp_path / "etc/hostname").stat().st_size == 3
    assert (tmp_path / "etc/gone").exists(), "whiteouts still made"


def test_rootless_refuses_device_nodes_outside_dev(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _no_mknod(monkeypatch)
    toc = Toc(entries=[Entry(name="opt/tty", type="char", mode=0o600, dev_major=5, dev_minor=0)])
    with pytest.raises(LazyshimError, match="device node 'opt/tty'"):
        build_tree(toc, tmp_path, TreeOptions(privileged=False))
