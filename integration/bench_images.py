"""The benchmark's big images: a debootstrap bookworm minbase layer plus one apt-installed app layer.

Why: the Targets in DESIGN.md are measured on these (py, pysci, gcc, pg); the small test images
(busybox, python) are the CI-size set. The base root comes from ``debootstrap --variant=minbase``
against the Debian mirror this machine's apt uses; each app layer is the upper directory of an
overlay mounted over that root while ``apt-get install`` ran in a chroot, turned into a tar with OCI
whiteouts. Both are cached under ``.cache/debootstrap/`` and fed to ``integration.images`` as
``TarLayer``s, so the OCI writer, push and ctr-remote/podman conversions are the same as for tests.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

from integration.images import ImageBuildError, ImageSpec, TarLayer, register_spec

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "debootstrap"
SUITE = "bookworm"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

APPS: dict[str, list[str]] = {
    "py": ["python3"],
    "pysci": ["python3-numpy", "python3-scipy", "python3-pandas"],
    "gcc": ["gcc", "libc6-dev"],
    "pg": ["postgresql"],
}


def debian_mirror() -> str:
    """The first Debian (non-security) mirror in /etc/apt/sources.list{,.d/*}."""
    files = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for m in re.finditer(r"^(?:URIs:\s*|deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", text, re.M):
            url = m.group(1)
            if "debian" in url and "security" not in url:
                return url
    return "http://deb.debian.org/debian"


def _sh(argv: list[str], timeout: float = 1800) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        tail = " | ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
        raise ImageBuildError(f"{' '.join(argv[:4])} ... failed ({p.returncode}): {tail}")


def base_rootfs() -> Path:
    """The debootstrapped root (cached); package caches emptied."""
    root = CACHE / "rootfs"
    if (CACHE / "rootfs.ok").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(root, ignore_errors=True)
    tmp = CACHE / "rootfs-tmp"
    if not (tmp / "etc/debian_version").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        _sh(["debootstrap", "--variant=minbase", SUITE, str(tmp), debian_mirror()])
    for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (tmp / d).glob("*"):
            if p.is_file():
                p.unlink()
    tmp.rename(root)
    (CACHE / "rootfs.ok").touch()
    return root


def _tar_tree(src: Path, dest: Path, overlay_upper: bool = False) -> None:
    """Tar a tree (sorted, numeric owners, modes and mtimes kept); with ``overlay_upper``, turn
    overlayfs whiteouts (0/0 char devices) and opaque dirs into OCI ``.wh.`` entries."""
    tmp = dest.with_suffix(".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames.sort()
            rel = Path(dirpath).relative_to(src)
            names = sorted(filenames + [d for d in dirnames if os.path.islink(Path(dirpath, d))])
            if overlay_upper and rel != Path("."):
                try:
                    if os.getxattr(dirpath, "trusted.overlay.opaque", follow_symlinks=False) == b"y":
                        tar.addfile(_wh_info(rel / ".wh..wh..opq"))
                except OSError:
                    pass
            for name in names + [d for d in dirnames if not os.path.islink(Path(dirpath, d))]:
                path = Path(dirpath, name)
                st = os.lstat(path)
                if overlay_upper and stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    tar.addfile(_wh_info(rel / f".wh.{name}"))
                    continue
                info = tar.gettarinfo(str(path), arcname=str(rel / name))
                info.uname = info.gname = ""
                if info.isreg():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    tmp.rename(dest)


def _wh_info(path: Path) -> tarfile.TarInfo:
    info = tarfile.TarInfo(str(path))
    info.mtime = 0
    return info


def base_tar() -> Path:
    dest = CACHE / f"{SUITE}-minbase.tar"
    if not dest.exists():
        _tar_tree(base_rootfs(), dest)
    return dest


def app_tar(name: str) -> Path:
    """The layer ``apt-get install APPS[name]`` adds on top of the base root (cached)."""
    dest = CACHE / f"app-{name}.tar"
    if dest.exists():
        return dest
    lower = base_rootfs()
    work = CACHE / f"build-{name}"
    shutil.rmtree(work, ignore_errors=True)
    upper, wdir, merged = work / "upper", work / "work", work / "merged"
    for d in (upper, wdir, merged):
        d.mkdir(parents=True)
    mounts: list[Path] = []
    try:
        _sh(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={wdir}",
             str(merged)])
        mounts.append(merged)
        for fs, target in (("proc", "proc"), ("/dev", "dev")):
            t = merged / target
            if fs == "proc":
                _sh(["mount", "-t", "proc", "proc", str(t)])
            else:
                _sh(["mount", "--bind", fs, str(t)])
            mounts.append(t)
        policy = merged / "usr/sbin/policy-rc.d"  # no services start in the chroot
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        env = ["env", "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C", PATH_ENV]
        _sh(["chroot", str(merged), *env, "apt-get", "update", "-qq"])
        _sh(["chroot", str(merged), *env, "apt-get", "install", "-y", "-qq", "--no-install-recommends",
             *APPS[name]])
        _sh(["chroot", str(merged), *env, "apt-get", "clean"])
        policy.unlink()
        for p in (merged / "var/lib/apt/lists").glob("*"):
            if p.is_file():
                p.unlink()
    finally:
        for m in reversed(mounts):
            subprocess.run(["umount", "-l", str(m)], capture_output=True)
    _tar_tree(upper, dest, overlay_upper=True)
    shutil.rmtree(work, ignore_errors=True)
    return dest


def debian_spec(name: str) -> ImageSpec:
    return ImageSpec(name, [TarLayer(base_tar()), TarLayer(app_tar(name))], cmd=["/bin/sh"], env=[PATH_ENV])


def register_all() -> None:
    """Make py/pysci/gcc/pg buildable by ``integration.images.build_and_push`` (built on first use)."""
    for name in APPS:
        register_spec(name, lambda name=name: debian_spec(name))


if __name__ == "__main__":
    import sys

    for n in sys.argv[1:] or list(APPS):
        print(app_tar(n))
