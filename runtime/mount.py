"""`lazyshim mount REF DIR` / `lazyshim umount DIR`: a lazy rootfs for other engines.

`podman run --rootfs DIR` and `ctr run --rootfs DIR` take a directory; mounting the image's
placeholder trees there (with a private upper dir) lets `--runtime lazyshim` /
`--runc-binary lazyshim` recognise it and attach the supervisor.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from shim import api
from shim.errors import LazyshimError

from . import overlay


def _scratch(store, target: Path) -> Path:
    key = hashlib.sha256(os.fsencode(os.path.realpath(target))).hexdigest()[:24]
    return store.root / "mounts" / key


def cmd_mount(args) -> int:
    store = api.open_store()
    image = api.ensure_image(store, args.image, pull=not args.no_pull)
    target = Path(args.dir)
    target.mkdir(parents=True, exist_ok=True)
    if os.path.ismount(target):
        raise LazyshimError(f"{target} is already a mount point")
    scratch = _scratch(store, target)
    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "upper").mkdir(parents=True)
    (scratch / "work").mkdir()
    from shim.userns import in_user_namespace

    spec = api.layer_mount(store, image)
    overlay.mount_overlay(spec.lowers, scratch / "upper", scratch / "work", target, userxattr=in_user_namespace(),
                          data_lowers=spec.data_lowers, options=spec.options)
    print(target)
    return 0


def cmd_umount(args) -> int:
    store = api.open_store()
    target = Path(args.dir)
    if not os.path.ismount(target):
        raise LazyshimError(f"{target} is not mounted")
    overlay.unmount(target)
    shutil.rmtree(_scratch(store, target), ignore_errors=True)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("mount", help="mount a lazy rootfs of an image at DIR (for --rootfs)")
    p.add_argument("--no-pull", action="store_true")
    p.add_argument("image")
    p.add_argument("dir")
    p.set_defaults(func=cmd_mount)
    p = sub.add_parser("umount", help="unmount a rootfs made by lazyshim mount")
    p.add_argument("dir")
    p.set_defaults(func=cmd_umount)
