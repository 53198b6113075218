"""Where lazyshim keeps things on disk, and how concurrent users of it stay out of each
other's way.

    STORE/layers/<alg>-<hex>/{meta.cbor, tree/, filled, .lock}   one per layer blob
    STORE/images/<alg>-<hex>.cbor                                  one per image manifest
    STORE/refs.cbor                                                name -> image id
    STORE/containers/<id>/                                         per-container state
    STORE/tmp/                                                     staging, same filesystem

Layers are shared by every image and container that uses them.  Everything that appears
under layers/ or images/ is built in tmp/ and renamed into place, so a crash never leaves
a half-built layer that looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from .. import errors


def default_root() -> Path:
    from .. import config

    env = config.get("root")
    if env:
        return Path(env)
    from ..userns import host_root

    if host_root():
        return Path("/var/lib/lazyshim")
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(xdg) / "lazyshim"


def digest_dirname(digest: str) -> str:
    alg, _, hexpart = digest.partition(":")
    if alg not in ("sha256", "sha512") or not hexpart or not all(c in "0123456789abcdef" for c in hexpart):
        raise errors.LazyshimError(f"invalid digest {digest[:80]!r}")
    return f"{alg}-{hexpart}"


class Store:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else default_root()

    @property
    def layers(self) -> Path:
        return self.root / "layers"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def containers(self) -> Path:
        return self.root / "containers"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def refs_file(self) -> Path:
        return self.root / "refs.cbor"

    def layer_dir(self, digest: str) -> Path:
        return self.layers / digest_dirname(digest)

    def image_file(self, image_id: str) -> Path:
        return self.images / (digest_dirname(image_id) + ".cbor")

    def ensure(self) -> None:
        for d in (self.layers, self.images, self.containers, self.tmp, self.root / "als"):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o711)  # containers' upper dirs below must be traversable

    @contextlib.contextmanager
    def lock(self, name: str, shared: bool = False) -> Iterator[None]:
        """An exclusive (or shared) lock on a store-wide name (e.g. a layer digest being
        built; "gc": pulls hold it shared, garbage collection exclusive)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        lockdir = self.root / "locks"
        lockdir.mkdir(exist_ok=True, mode=0o700)
        fd = os.open(lockdir / name, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
