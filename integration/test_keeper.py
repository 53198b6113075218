"""The keeper: SIGKILL of the supervisor costs a container a pause, not an error.

The supervisor is killed twice: once while the container is idle (a restart in place), and
once while it opens unfilled files in a loop; every file must still read byte-exact, and
`lazyshim stats` counts the restarts.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
from pathlib import Path

from integration.test_lazy_run import LAZYSHIM, lazyshim
from integration.test_supervisor import _Container
from runtime.stats import stats

LIB = "/usr/lib/python3.11"
LOOP = f"""
import hashlib, os, sys
names = sorted(f for f in os.listdir({LIB!r}) if f.endswith('.py'))
print('ready', flush=True); sys.stdin.readline()
print(hashlib.sha256(open({LIB!r} + '/textwrap.py', 'rb').read()).hexdigest(), 'after-idle-restart', flush=True)
print('looping', flush=True); sys.stdin.readline()
for name in names:
    print(hashlib.sha256(open({LIB!r} + '/' + name, 'rb').read()).hexdigest(), name, flush=True)
print('done', flush=True); sys.stdin.readline()
"""


class _PyContainer(_Container):
    def __init__(self, store: Path, ref: str, script: str) -> None:
        self.name = f"k{os.getpid()}{random.randrange(1 << 30)}"
        self.proc = subprocess.Popen(
            LAZYSHIM + ["run", "--rm", "-i", "--no-background-fetch", "--name", self.name, ref, "python3", "-c",
                        script],
            env=dict(os.environ, LAZYSHIM_ROOT=str(store)),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self._seen = ""


def _stop(c: _Container) -> None:
    """After a failure: the container itself too, not only `lazyshim run` (runc would keep it)."""
    if c.proc.poll() is None:
        from runtime.attach import runtime_dir

        for verb in (["kill", c.name, "KILL"], ["delete", "--force", c.name]):
            subprocess.run(["runc", "--root", str(runtime_dir() / "delegate"), *verb], capture_output=True)
        c.proc.kill()
        c.proc.wait()


def _kill_and_wait(pid: int) -> None:
    """SIGKILL and wait until it is gone (a pidfd turns readable when the process exits)."""
    fd = os.pidfd_open(pid)
    try:
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        import select

        assert select.select([fd], [], [], 60)[0], f"supervisor {pid} did not die"
    finally:
        os.close(fd)


def test_supervisor_killed_idle_and_mid_fill_the_container_finishes_byte_exact(
        tmp_path: Path, images: dict[str, str]) -> None:
    store = tmp_path / "store"
    ref = images["python:esgz"]
    lazyshim(store, "pull", ref)
    c = _PyContainer(store, ref, LOOP)
    try:
        c.expect("ready")
        first = stats(c.name)
        assert first["restarts"] == 0
        _kill_and_wait(first["pid"])  # idle: an upgrade in place looks the same
        c.send("go")
        out = c.expect("looping")
        second = stats(c.name)
        assert second["restarts"] == 1 and second["pid"] != first["pid"]
        c.send("go")
        out += c.expect(".py")  # the loop runs: kill while it opens unfilled files
        _kill_and_wait(second["pid"])
        out += c.expect("done", timeout=120)
        assert stats(c.name)["restarts"] == 2
        c.send("go")
        out += c.finish()
    finally:
        _stop(c)
    assert c.proc.returncode == 0, out
    got = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            got[parts[1]] = parts[0]
    want = {name: hashlib.sha256(Path(LIB, name).read_bytes()).hexdigest()
            for name in os.listdir(LIB) if name.endswith(".py")}
    assert got.pop("after-idle-restart") == want["textwrap.py"]
    wrong = [n for n, h in got.items() if want.get(n) != h]
    assert not wrong, f"bytes that are not the image's: {wrong[:5]}"
    assert len(got) == len(want), f"{len(want) - len(got)} files missing from the output"
