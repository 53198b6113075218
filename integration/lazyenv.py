"""A private lazyshim for a test: its own store and runtime dir, and what it left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shim.store.layout import Store

LAZYSHIM = [sys.executable, "-m", "runtime.main"]
RUNC = shutil.which("runc") or "runc"


class Env:
    def __init__(self, tmp_path: Path) -> None:
        self.store = tmp_path / "store"
        # Socket paths hold 107 bytes: keep the runtime dir short, as /run/lazyshim is.
        self.rundir = Path(tempfile.mkdtemp(prefix="lzr-"))
        self.env = dict(os.environ, LAZYSHIM_ROOT=str(self.store), LAZYSHIM_RUNTIME_DIR=str(self.rundir))

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run(LAZYSHIM + list(args), env=self.env, capture_output=True, text=True, timeout=180,
                           stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise AssertionError(f"lazyshim {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
        return p

    def popen(self, *args: str, out=subprocess.PIPE) -> subprocess.Popen:
        """`out`: a file, not a pipe, when the run is killed: runc and the container keep
        their end of a pipe open, and a pipe would never see EOF."""
        return subprocess.Popen(LAZYSHIM + list(args), env=self.env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, text=True)

    def delegate_list(self) -> str:
        root = self.rundir / "delegate"
        if not root.exists():
            return ""
        p = subprocess.run([RUNC, "--root", str(root), "list", "-q"], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        return p.stdout.strip()

    def remove_containers(self) -> None:
        """What a failed test left running: its detached containers."""
        left = self("ps", "-a", "-q", check=False).stdout.split()
        if left:
            self("rm", "-f", *left, check=False)

    def _store_mounts(self) -> list[tuple[str, bool]]:
        """(mount point, is the store's own) for every mount under the store, from the kernel's
        table.  The store's own: its metadata tmpfs (layout v2) and the read-only layer views
        on it, which stay as long as the store has layers."""
        from shim.store.layouts import view_root
        from shim.store.metatree import layer_of_metadir

        prefix = str(self.store) + "/"
        meta = str(view_root(Store(self.store)))
        out = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                point, opts = parts[4], parts[5].split(",")
                if not point.startswith(prefix):
                    continue
                fstype = parts[parts.index("-") + 1]
                view = layer_of_metadir(Path(point))
                own = ((point == meta and fstype == "tmpfs")
                       or (fstype == "overlay" and "ro" in opts and view is not None and view[0] == self.store))
                out.append((point, own))
        return out

    def mounts(self) -> list[str]:
        """Mounts under the store that containers and scratch dirs made (all of them must go
        with their container): every mount there but the store's own."""
        return [point for point, own in self._store_mounts() if not own]

    def own_mounts(self) -> list[str]:
        return [point for point, own in self._store_mounts() if own]

    def state_dirs(self) -> list[str]:
        if not self.rundir.exists():
            return []
        return sorted(n for n in os.listdir(self.rundir) if n not in ("delegate", "sock", "oci", "net"))

    def oci_state(self, root: Path, cid: str) -> Path:
        from runtime.paths import root_key

        return self.rundir / "oci" / root_key(str(root)) / cid

    def supervisor_pid(self, root: Path, cid: str) -> int:
        return int((self.oci_state(root, cid) / "supervisor.pid").read_text())

    def assert_nothing_left(self, name: str) -> None:
        assert self.delegate_list() == "", "the container is still known to the delegate"
        assert self.mounts() == [], "a mount under the store is left"
        assert self.state_dirs() == [], "a state dir is left"
        assert not (self.store / "containers" / name).exists(), "--rm left the container dir"


def poll(pred, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)  # polling observable state with a deadline
    raise AssertionError(f"timed out waiting for {what}")
