"""The peer lazyshim is measured against: stargz-snapshotter's ``stargz-store`` under podman.

Why this peer: it is the reference lazy puller for eStargz, and ``stargz-store`` plugs into podman
as an *additional layer store* (a FUSE file system whose ``<ref>/<layer digest>/diff`` directories
podman mounts as overlay lower layers), so the same podman runs the same eStargz image either way.

Built offline by ``make peers`` (Debian ships the package sources, not the command) from our own
small ``integration/peers/stargz-store/main.go``, in GOPATH mode against /usr/share/gocode, into
``.cache/peers/stargz-store``. The benchmark and the demo only use it: a missing binary makes the
``stargz`` variants report "not built" instead of failing the run.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from integration.procs import stop_group

REPO = Path(__file__).resolve().parent.parent
PEERS_DIR = REPO / ".cache" / "peers"
STARGZ_STORE = PEERS_DIR / "stargz-store"
MOUNT_TIMEOUT_S = 30.0


class PeerError(RuntimeError):
    """A peer is not built, did not mount, or did not stop; the message is one line."""


def stargz_store_binary() -> Path | None:
    """The built ``stargz-store``, or None when ``make peers`` has not run."""
    return STARGZ_STORE if os.access(STARGZ_STORE, os.X_OK) else None


def store_config(plain_http: Sequence[str] = (), *, prefetch: bool = True, background_fetch: bool = True) -> str:
    """The TOML our ``stargz-store`` reads (fs/config keys, plus the plain-HTTP registries).

    Defaults are stargz-snapshotter's own (prefetch of the prioritized files, background fetch on):
    the peer is measured as users run it.
    """
    lines = [f"noprefetch = {str(not prefetch).lower()}",
             f"no_background_fetch = {str(not background_fetch).lower()}",
             "no_prometheus = true"]
    hosts = ", ".join(f'"{h}"' for h in plain_http)
    lines.append(f"plain_http_registries = [{hosts}]")
    return "\n".join(lines) + "\n"


def podman_storage_conf(graphroot: Path, runroot: Path, layer_store: Path | None = None, *,
                        partial: bool = False) -> str:
    """A private podman storage.conf; with ``layer_store`` it is podman's additional layer store.

    ``:ref`` makes podman pass the image reference in the path (``<store>/<base64 ref>/<digest>``),
    which is the layout stargz-store serves. ``partial`` enables podman's own zstd:chunked partial pulls.
    """
    opts = [f'pull_options = {{enable_partial_images = "{str(partial).lower()}", use_hard_links = "false"}}']
    if layer_store is not None:
        opts.append(f'additionallayerstores = ["{layer_store}:ref"]')
    return ('[storage]\ndriver = "overlay"\n'
            f'graphroot = "{graphroot}"\nrunroot = "{runroot}"\n'
            "[storage.options]\n" + "\n".join(opts) + "\n")


def _mounted(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


class StargzStore:
    """One ``stargz-store`` process with its own root and FUSE mount, stopped (and unmounted) on exit.

    ``prefix`` (a network namespace's nsenter) runs it where the registry's loopback is.
    """

    def __init__(self, workdir: Path, plain_http: Sequence[str] = (), prefix: Sequence[str] = ()) -> None:
        binary = stargz_store_binary()
        if binary is None:
            raise PeerError(f"stargz-store is not built ({STARGZ_STORE} missing: run `make peers`)")
        self.binary = binary
        self.dir = workdir
        self.mountpoint = workdir / "mnt"
        self.plain_http = list(plain_http)
        self.prefix = list(prefix)
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StargzStore:
        (self.dir / "root").mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        cfg = self.dir / "config.toml"
        cfg.write_text(store_config(self.plain_http))
        self.log = self.dir / "stargz-store.log"
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(
                [*self.prefix, str(self.binary), "-root", str(self.dir / "root"), "-config", str(cfg),
                 str(self.mountpoint)], stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + MOUNT_TIMEOUT_S
        while not _mounted(self.mountpoint):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
                self.__exit__()
                raise PeerError(f"stargz-store did not mount {self.mountpoint}: {tail or 'no output'}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        proc, self._proc = self._proc, None
        stop_group(proc, 10)  # on SIGTERM it unmounts itself; the umount below is for a crash
        if _mounted(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)


@contextlib.contextmanager
def stargz_podman(d: Path, registry_host: str, prefix: Sequence[str] = ()) -> Iterator[Path]:
    """A fresh stargz-store under ``d/store`` and a podman storage.conf (``d/root``, ``d/rr``) using it.

    Yields the storage.conf; the store is stopped and unmounted on exit (``d`` itself is the caller's).
    """
    with StargzStore(d / "store", [registry_host], prefix) as store:
        conf = d / "storage.conf"
        conf.write_text(podman_storage_conf(d / "root", d / "rr", store.mountpoint))
        yield conf
