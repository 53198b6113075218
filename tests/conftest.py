"""Shared in-process fixtures: small layers built with our own writers."""

from __future__ import annotations

import os
import tarfile

import pytest


def reg(name: str, data: bytes, **kw) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.mode = kw.pop("mode", 0o644)
    ti.mtime = kw.pop("mtime", 1_700_000_000)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, data


def other(name: str, typ: bytes, **kw) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type = typ
    ti.mode = kw.pop("mode", 0o755 if typ == tarfile.DIRTYPE else 0o644)
    ti.mtime = kw.pop("mtime", 1_700_000_000)
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti, None


def sample_entries() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    rnd = os.urandom(300_000)
    xattr_file = reg("etc/cap", b"caps", pax_headers={"SCHILY.xattr.security.capability": "\x01\x02"})
    return [
        other("etc", tarfile.DIRTYPE),
        reg("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
        xattr_file,
        other("bin", tarfile.DIRTYPE),
        reg("bin/sh", rnd, mode=0o755, uid=0, gid=0),
        reg("bin/zeros", bytes(200_000) + b"x"),
        reg("bin/empty", b""),
        other("bin/ash", tarfile.LNKTYPE, linkname="bin/sh"),
        other("bin/link", tarfile.SYMTYPE, linkname="/bin/sh"),
        other("dev", tarfile.DIRTYPE),
        other("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3),
        other("run/fifo", tarfile.FIFOTYPE),
        reg("usr/share/long/" + "n" * 150, b"a file with a long name"),
    ]


@pytest.fixture
def entries():
    return sample_entries()


def contents(entries) -> dict[str, bytes]:
    return {ti.name: data for ti, data in entries if ti.isreg()}
