"""Fills under injected registry faults: zero unverified bytes, bounded waits, the
supervisor stays up, filled files keep working, and fills resume once the fault is gone.

The registry is real; integration/faultproxy.py sits in front of it and breaks the range
requests fills send.  The image is pulled through the proxy before the fault is set, so
the pull itself is never faulted and every fill goes through the proxy.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
from pathlib import Path

import pytest

from integration.faultproxy import Fault, FaultProxy
from integration.images import RANDOM_FILE_SIZE
from integration.registry import Registry
from integration.test_lazy_run import lazyshim
from integration.test_supervisor import HELLO, _Container

RANDOM_SHA = hashlib.sha256(random.Random(20240601).randbytes(RANDOM_FILE_SIZE)).hexdigest()
FETCH_TIMEOUT = "2"  # seconds: one fill's network time, retries included
# Errors go to stdout inside the container: a foreground runc copies the container's stdout and
# stderr through two pipes of its own, so their lines may reach the test in either order.
SCRIPT = (
    "cat /app/hello.txt; echo ready; read x; "
    "sha256sum /app/random.bin 2>&1 || echo OPEN-FAILED rc=$?; "
    "cat /app/hello.txt; "  # filled before the fault: must keep working
    "echo phase2; read x; "
    "sha256sum /app/random.bin"
)

#: (case, fault or "vanish", what an open under the fault sees: "ok" after a retry, or "eio")
CASES = [
    ("reset-once", Fault("reset", count=1), "ok"),
    ("reset", Fault("reset"), "eio"),
    ("503-once", Fault("status", count=1, status=503), "ok"),
    ("503", Fault("status", status=503), "eio"),
    ("429-retry-after", Fault("status", count=1, status=429, headers={"Retry-After": "1"}), "ok"),
    # Longer than the fill's whole budget: fail now rather than sleep past it.  Two requests: the
    # miss's own and its readahead's are in flight at once, in either order; a retry is a third.
    ("429-retry-after-too-long", Fault("status", count=2, status=429, headers={"Retry-After": "3600"}), "eio"),
    ("truncated-once", Fault("truncate", count=1), "ok"),
    ("truncated", Fault("truncate"), "eio"),
    ("wrong-bytes", Fault("corrupt"), "eio"),
    ("stall", Fault("stall"), "eio"),
    ("vanish", "vanish", "eio"),
]


@pytest.fixture
def proxy(registry: Registry, images: dict[str, str]):
    with FaultProxy(registry.host) as p:
        yield p


@pytest.mark.parametrize(("case", "fault", "seen"), CASES, ids=[c[0] for c in CASES])
def test_fill_under_fault(tmp_path: Path, proxy: FaultProxy, case: str, fault, seen: str) -> None:
    store = tmp_path / "store"
    ref = f"{proxy.host}/busybox:esgz"
    lazyshim(store, "pull", ref)
    c = _Container(store, ref, SCRIPT, env={"LAZYSHIM_FETCH_TIMEOUT": FETCH_TIMEOUT})
    try:
        before = c.expect("ready")
        assert HELLO.strip() in before
        if fault == "vanish":
            proxy.vanish()
        else:
            proxy.set(fault)
        c.send("go")
        under = c.expect("phase2", timeout=60)  # bounded: a hang fails here
        from runtime.attach import state_dir

        sup = int((state_dir(c.name) / "supervisor.pid").read_text())
        os.kill(sup, 0)  # the supervisor is still up (raises if it died)
        if fault == "vanish":
            proxy.come_back()
        else:
            proxy.clear()
        c.send("go")
        after = c.finish()
    finally:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()
    hashes = re.findall(r"\b[0-9a-f]{64}\b", under + after)
    assert all(h == RANDOM_SHA for h in hashes), f"{case}: unverified bytes reached the container: {under!r}"
    assert HELLO.strip() in under, f"{case}: a filled file stopped working: {under!r}"
    if seen == "ok":
        assert RANDOM_SHA in under and "OPEN-FAILED" not in under, f"{case}: {under!r}"
        assert proxy.faulted >= 1, f"{case}: the fault never hit a fill"
    else:
        assert "OPEN-FAILED" in under and "Input/output error" in under, f"{case}: {under!r}"
        assert RANDOM_SHA not in under
    assert RANDOM_SHA in after, f"{case}: fills did not resume once the fault was gone: {after!r}"
    assert c.proc.returncode == 0
