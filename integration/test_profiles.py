"""Learned start-up profiles end to end: real registry (behind a proxy that logs the ranges
asked for, in arrival order), real runc, real overlayfs.

Run 1 records what the workload opened; `lazyshim rmi` and a fresh pull throw every fetched
byte away but keep the profile; run 2 fetches the profile's files in large coalesced requests
before the workload's first on-demand fill, and prints the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from integration.faultproxy import FaultProxy
from integration.registry import Registry
from integration.test_lazy_run import lazyshim

#: Prints the digest of a few files, then of the file $EXTRA names (if set): the same command
#: on both runs (a profile is keyed by argv and cwd), one file more on run 2, fetched on demand.
SCRIPT = (
    "import hashlib,os,sys\n"
    "for p in sys.argv[1:] + [os.environ[k] for k in ('EXTRA',) if k in os.environ]:\n"
    "    print(p, hashlib.sha256(open(p,'rb').read()).hexdigest())\n"
)
FILES = ["/usr/bin/python3.11", "/usr/lib/python3.11/json/decoder.py", "/etc/passwd"]
EXTRA = "/usr/lib/python3.11/wave.py"
PRIORITIZED = {"LAZYSHIM_BACKGROUND_FETCH": "prioritized"}  # the profile and landmarks, nothing more


@pytest.fixture
def proxy(registry: Registry, images: dict[str, str]):
    with FaultProxy(registry.host) as p:
        yield p


def _run(store: Path, ref: str, *extra: str) -> str:
    p = subprocess.run([sys.executable, "-m", "runtime.main", "run", "--rm", *extra, ref, "python3", "-c", SCRIPT,
                        *FILES], env=dict(os.environ, LAZYSHIM_ROOT=str(store), **PRIORITIZED),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _spans(store: Path, names: set[str]) -> dict[str, tuple[str, int, int]]:
    """(layer digest, start, end) of the compressed bytes of each named file, as the store has them."""
    from shim.store.layout import Store
    from shim.store.layouts import load_meta

    st = Store(store)
    out = {}
    for d in sorted(p.name.replace("-", ":", 1) for p in (store / "layers").iterdir()):
        for e in load_meta(st, d).toc.entries:
            if e.name in names and e.type == "reg" and e.chunks:
                data = [c for c in e.chunks if not c.zeros]
                out[e.name] = (d, min(c.offset for c in data), max(c.end for c in data))
    return out


def _range(header: str) -> tuple[int, int]:
    start, _, end = header.removeprefix("bytes=").partition("-")
    return int(start), int(end) + 1


def test_profile_recorded_on_run_1_is_fetched_first_on_run_2(tmp_path: Path, proxy: FaultProxy,
                                                             images: dict[str, str]) -> None:
    store = tmp_path / "store"
    ref = f"{proxy.host}/python:esgz"
    lazyshim(store, "pull", ref)
    first = _run(store, ref)
    shown = json.loads(lazyshim(store, "profile", "show", "--format", "json", ref).stdout)
    assert len(shown) == 1
    recorded = [f["path"] for f in shown[0]["files"]]
    for f in FILES:
        assert f in recorded, f"{f} not in the profile: {recorded[:20]}"
    assert EXTRA not in recorded
    assert recorded.index("/usr/bin/python3.11") < recorded.index("/usr/lib/python3.11/json/decoder.py")

    # Every fetched byte goes; the profile stays.
    removed = lazyshim(store, "rmi", ref)
    assert "kept 1 start-up profile(s) of removed images" in removed.stderr
    lazyshim(store, "pull", ref)
    proxy.ranges.clear()
    second = _run(store, ref, "-e", f"EXTRA={EXTRA}")

    assert second.splitlines()[:len(FILES)] == first.splitlines()
    got = dict(line.split() for line in second.splitlines())
    assert got["/usr/bin/python3.11"] == hashlib.sha256(Path("/usr/bin/python3.11").read_bytes()).hexdigest()
    assert got[EXTRA] == hashlib.sha256(Path(EXTRA).read_bytes()).hexdigest()

    profile_names = {p.lstrip("/") for p in recorded}
    spans = _spans(store, profile_names | {EXTRA.lstrip("/")})
    extra_span = spans[EXTRA.lstrip("/")]

    def kind(digest: str, header: str) -> str:
        start, end = _range(header)
        if digest == extra_span[0] and start <= extra_span[1] and extra_span[2] <= end:
            return "on-demand"
        touched = [n for n, (d, s, e) in spans.items() if n in profile_names and d == digest and s < end and start < e]
        return "profile" if touched else "other"

    kinds = [kind(d, h) for d, h in proxy.ranges]
    # The first miss's own request and its readahead go out together, in either order.
    cut = next((i for i, k in enumerate(kinds) if k != "profile"), len(kinds))
    assert cut > 0, kinds
    assert "on-demand" in kinds[cut:], f"{EXTRA} was not fetched on demand after the profile: {kinds}"
    assert "profile" not in kinds[cut:], f"a profile file was fetched after the workload's first miss: {kinds}"
    # Coalesced: far fewer requests than files, the largest of them holding many.
    assert cut <= len(profile_names) / 2, (cut, len(profile_names))
    largest = max(_range(h)[1] - _range(h)[0] for _, h in proxy.ranges[:cut])
    assert largest >= 1 << 20, f"the largest profile request is only {largest} bytes"


def test_profiles_move_to_a_fresh_store_and_go_with_profile_rm(tmp_path: Path, images: dict[str, str]) -> None:
    store, fresh = tmp_path / "store", tmp_path / "fresh"
    ref = images["python:esgz"]
    lazyshim(store, "pull", ref)
    _run(store, ref)
    listed = lazyshim(store, "profile", "show").stdout
    assert "python" in listed and "FILES" in listed
    exported = tmp_path / "profile.json"
    lazyshim(store, "profile", "export", "-o", str(exported), ref)
    lazyshim(fresh, "profile", "import", str(exported))
    # Not pulled in the fresh store: the repository names it.
    shown = lazyshim(fresh, "profile", "show", ref).stdout
    assert "/usr/bin/python3.11" in shown.splitlines()
    assert lazyshim(fresh, "profile", "rm", ref).stdout.strip() == "removed 1 profile(s)"
    assert lazyshim(fresh, "profile", "show", "--format", "json").stdout.strip() == "[]"


@pytest.mark.parametrize("content", [b"[" * 100_000, b'[{"v": 1, "image": "sha256:x"}]', b"\xff\xfe"])
def test_a_hostile_import_is_one_line_and_adds_nothing(tmp_path: Path, content: bytes) -> None:
    store = tmp_path / "store"
    bad = tmp_path / "bad.json"
    bad.write_bytes(content)
    p = lazyshim(store, "profile", "import", str(bad), check=False)
    assert p.returncode == 1 and p.stderr.startswith("lazyshim: ") and p.stderr.count("\n") == 1, p.stderr
    assert lazyshim(store, "profile", "show", "--format", "json").stdout.strip() == "[]"


def test_profiles_off_learns_nothing(tmp_path: Path, images: dict[str, str]) -> None:
    store = tmp_path / "store"
    ref = images["python:esgz"]
    lazyshim(store, "pull", ref)
    p = subprocess.run([sys.executable, "-m", "runtime.main", "run", "--rm", ref, "python3", "-c", "pass"],
                       env=dict(os.environ, LAZYSHIM_ROOT=str(store), LAZYSHIM_PROFILES="off"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert lazyshim(store, "profile", "show", "--format", "json").stdout.strip() == "[]"
    p = subprocess.run([sys.executable, "-m", "runtime.main", "run", "--rm", ref, "python3", "-c", "pass"],
                       env=dict(os.environ, LAZYSHIM_ROOT=str(store), LAZYSHIM_PROFILES="maybe"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 125 and p.stderr.strip() == "lazyshim: profiles = 'maybe': expected on or off"


def test_a_profile_pushed_beside_the_image_starts_another_node_warm(tmp_path: Path, images: dict[str, str]) -> None:
    store, other = tmp_path / "store", tmp_path / "other"
    ref = images["python:esgz"]
    lazyshim(store, "pull", ref)
    _run(store, ref)
    image_id = lazyshim(store, "images", "--format", "{{.Id}}").stdout.split()[0]
    artifact = lazyshim(store, "profile", "push", ref).stdout.strip()
    assert artifact == f"{ref.rsplit(':', 1)[0]}:{image_id.replace(':', '-')}.lazyshim-profile"
    lazyshim(other, "pull", ref)
    assert lazyshim(other, "profile", "pull", ref).stdout.strip() == "pulled 1 profile(s)"
    assert "/usr/bin/python3.11" in lazyshim(other, "profile", "show", ref).stdout.splitlines()
    # An image nobody published a profile for: one line.
    bb = images["busybox:esgz"]
    lazyshim(other, "pull", bb)
    p = lazyshim(other, "profile", "pull", bb, check=False)
    assert p.returncode == 1 and p.stderr.startswith("lazyshim: ") and p.stderr.count("\n") == 1, p.stderr
