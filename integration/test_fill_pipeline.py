"""The fill pipeline end to end (real registry, real runc, both store layouts): readahead
never serves an unverified byte, and a supervisor killed right after it answered leaves
nothing a new container could read as a hole."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from integration.registry import Registry
from integration.test_store_layouts import image_digests, run
from integration.test_supervisor import _Container
from shim.store.layout import Store
from shim.store.layouts import load_meta

MISSED = "usr/lib/python3.11/json/decoder.py"


def _layer_holding(store: Path, name: str):
    s = Store(store)
    for d in sorted(s.layers.iterdir()):
        meta = load_meta(s, d.name.replace("-", ":", 1))
        for i, e in enumerate(meta.toc.entries):
            if e.name == name:
                return meta, i
    raise AssertionError(f"{name} is in no layer")


def _next_in_blob(meta, idx: int) -> int:
    entries = meta.toc.entries
    start = entries[idx].chunks[0].offset
    after = [(e.chunks[0].offset, i) for i, e in enumerate(entries)
             if e.type == "reg" and e.size > 100 and e.chunks and e.chunks[0].offset > start]
    return min(after)[1]


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_readahead_never_serves_a_corrupt_neighbour(layout: str, tmp_path: Path, images: dict[str, str],
                                                    registry: Registry) -> None:
    """A byte flipped in the registry's copy of the missed file's neighbour in the blob: the
    missed file opens with its exact bytes, the neighbour's own open fails with EIO."""
    store = tmp_path / "store"
    ref = images["python:esgz"]
    run(store, layout, "pull", ref)
    meta, idx = _layer_holding(store, MISSED)
    neighbour = meta.toc.entries[_next_in_blob(meta, idx)]
    repo = ref.partition("/")[2].partition(":")[0]
    blob = registry.blob_path(repo, meta.digest)
    original = blob.read_bytes()
    c = neighbour.chunks[0]
    data = bytearray(original)
    data[(c.offset + c.end) // 2] ^= 0xFF
    script = (
        "import hashlib, sys\n"
        "print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())\n"
        "try:\n"
        "    open(sys.argv[2], 'rb').read(); print('READ')\n"
        "except OSError as e:\n"
        "    print('ERR', e.errno)\n"
    )
    try:
        blob.write_bytes(bytes(data))
        p = run(store, layout, "run", "--rm", "--no-background-fetch", ref, "python3", "-c", script,
                "/" + MISSED, "/" + neighbour.name, check=False)
    finally:
        blob.write_bytes(original)
    lines = p.stdout.split()
    assert lines[:1] == [meta.toc.entries[idx].digest.removeprefix("sha256:")], p
    assert lines[1:] == ["ERR", "5"], p


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_supervisor_killed_after_an_answer_leaves_no_hole(layout: str, tmp_path: Path,
                                                          images: dict[str, str]) -> None:
    """SIGKILL of the supervisor as soon as the container has read a file (before any
    background flush could run): a new container reads every file with its exact bytes."""
    from runtime.paths import runtime_dir

    store = tmp_path / "store"
    ref = images["busybox:esgz"]
    run(store, layout, "pull", ref)
    env = {"LAZYSHIM_STORE_LAYOUT": layout}
    c = _Container(store, ref, "sha256sum /app/random.bin /app/hello.txt; echo read; read x", env=env)
    try:
        c.expect("read")
        pid = int((Path(runtime_dir()) / c.name / "supervisor.pid").read_text())
        os.kill(pid, signal.SIGKILL)
    finally:
        c.send("go")  # `read` is not trapped: the shell ends, and `lazyshim run` cleans up
        c.finish()
    want = {n: d for n, d in image_digests(store).items() if n.startswith("app/")}
    script = "; ".join(f"sha256sum /{n} || echo FAIL" for n in sorted(want))
    p = run(store, layout, "run", "--rm", "--no-background-fetch", ref, "sh", "-c", script)
    got = {line.split()[1].lstrip("/"): "sha256:" + line.split()[0] for line in p.stdout.splitlines()
           if not line.startswith("FAIL")}
    assert len(want) >= 3 and got == want, p.stdout
