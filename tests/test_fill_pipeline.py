"""The fill pipeline in-process: one range merger, readahead across files, commits that are
readable at once and marked on disk only after a flush."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import reg
from test_convert_store import _lazy_layer

from shim.ranges import merge
from shim.store import filler as filler_mod
from shim.store.filler import SYNCER, FileBlobSource, FillError


def test_merge_joins_near_and_overlapping_ranges_and_caps_spans() -> None:
    spans = merge([(0, 10, "a"), (12, 20, "b"), (100, 110, "c"), (105, 108, "d")], gap=2)
    assert [(s.start, s.end, s.keys) for s in spans] == [(0, 20, ["a", "b"]), (100, 110, ["c", "d"])]
    capped = merge([(0, 10, 1), (10, 20, 2), (20, 30, 3)], gap=0, max_span=20)
    assert [(s.start, s.end) for s in capped] == [(0, 20), (20, 30)]
    assert [(s.start, s.end) for s in merge([(0, 50, 1)], max_span=10)] == [(0, 50)]  # never split
    assert merge([(5, 5, 1)]) == []


class _CountingSource(FileBlobSource):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def read_range(self, start: int, end: int) -> bytes:
        with self._lock:
            self.reads.append((start, end))
        return super().read_range(start, end)


def _files(n: int = 40) -> list:
    return [reg(f"lib/m{i:03d}.py", os.urandom(3000) + b"x" * 5000) for i in range(n)]


def _filler_with(tmp_path: Path, entries):
    _, meta, filler = _lazy_layer(tmp_path, "estargz", entries)
    source = _CountingSource(tmp_path / "blob")
    filler._source = source
    regs = {e.name: i for i, e in enumerate(meta.toc.entries) if e.type == "reg" and e.size}
    return meta, filler, source, regs


def _wait_idle(filler) -> None:
    filler_mod._pool().submit(lambda: None).result()  # readahead tasks queued before this ran
    while filler._inflight:
        for ev in list(filler._inflight.values()):
            ev.wait(5)


def test_a_miss_reads_its_neighbours_ahead_in_one_request(tmp_path: Path) -> None:
    entries = _files()
    meta, filler, source, regs = _filler_with(tmp_path, entries)
    filler.fill(regs["lib/m000.py"])
    _wait_idle(filler)
    ahead = [n for n, i in regs.items() if filler.is_filled(i)]
    assert len(ahead) > 5 and len(source.reads) == 2, (ahead, source.reads)
    for ti, data in entries:
        if ti.name in ahead:
            assert (tmp_path / "layer/tree" / ti.name).read_bytes() == data
    # The next miss just past the window reads a bigger window: fewer requests than files.
    opened = 0
    for name in sorted(regs):
        if not filler.is_filled(regs[name]):
            filler.fill(regs[name])
            _wait_idle(filler)
        opened += 1
    assert len(source.reads) < opened / 4, (len(source.reads), opened)


def test_a_corrupt_neighbour_fails_alone(tmp_path: Path) -> None:
    entries = _files(10)
    meta, filler, source, regs = _filler_with(tmp_path, entries)
    bad = meta.toc.entries[regs["lib/m002.py"]]
    blob = bytearray((tmp_path / "blob").read_bytes())
    c = bad.chunks[0]
    blob[(c.offset + c.end) // 2] ^= 0xFF
    (tmp_path / "blob").write_bytes(bytes(blob))
    filler.fill(regs["lib/m000.py"])
    _wait_idle(filler)
    assert (tmp_path / "layer/tree/lib/m000.py").read_bytes() == entries[0][1]
    assert not filler.is_filled(regs["lib/m002.py"])
    assert (tmp_path / "layer/tree/lib/m002.py").stat().st_blocks == 0, "an unverified byte stayed"
    assert filler.is_filled(regs["lib/m003.py"])
    with pytest.raises(FillError):
        filler.fill(regs["lib/m002.py"])


@contextlib.contextmanager
def held_flush() -> Iterator[threading.Event]:
    """The background flush blocks in its sync until the yielded event is set (or the block
    ends): commits are visible in memory while their durable marks have not landed."""
    gate = threading.Event()
    real_sync = filler_mod.sync_dir

    def slow_sync(path: Path) -> None:
        gate.wait(10)
        real_sync(path)

    filler_mod.sync_dir = slow_sync
    try:
        yield gate
    finally:
        gate.set()
        filler_mod.sync_dir = real_sync


def test_a_commit_is_readable_at_once_and_marked_after_the_flush(tmp_path: Path) -> None:
    entries = _files(3)
    meta, filler, source, regs = _filler_with(tmp_path, entries)
    filler.readahead = False
    with held_flush() as gate:
        i = regs["lib/m001.py"]
        filler.fill(i)
        assert filler.is_filled(i) and not filler.filled[i], "marked before the flush"
        gate.set()
        SYNCER.flush()
        assert filler.filled[i]


def test_needed_libraries_of_an_elf_and_hostile_headers() -> None:
    from shim.supervisor.execchain import needed_libraries

    with open("/usr/bin/python3.11", "rb") as f:
        data = f.read()

    def pread(blob: bytes):
        return lambda n, off: blob[off:off + n]

    assert b"libc.so.6" in needed_libraries(pread(data))
    assert needed_libraries(pread(b"#!/bin/sh\n")) == []
    broken = bytearray(data[:4096])  # program headers, but the dynamic section cut off
    assert needed_libraries(pread(bytes(broken))) == []
    huge = bytearray(data[:64])
    huge[54:58] = (56).to_bytes(2, "little") + (0xFFFF).to_bytes(2, "little")  # 65535 headers
    assert needed_libraries(pread(bytes(huge))) == []


class _DeadSource:
    def read_range(self, start: int, end: int) -> bytes:
        raise OSError("the registry is gone")


def test_a_lost_mark_is_recovered_from_the_verified_bytes_in_place(tmp_path: Path) -> None:
    """v1: a process killed after its fill but before its flush leaves the bytes in place and
    no mark.  The next filler checks them against the TOC and keeps them without a fetch (a
    refetch that failed would make the file sparse under readers that already hold it open);
    bytes that do not verify are fetched again."""
    entries = _files(3)
    meta, filler, source, regs = _filler_with(tmp_path, entries)
    filler.readahead = False
    good, bad = regs["lib/m000.py"], regs["lib/m001.py"]
    try:
        with held_flush():
            filler.fill(good)
            filler.fill(bad)
            assert not filler.filled[good] and not filler.filled[bad]  # the flush has not run: "killed"
            tree = tmp_path / "layer/tree"
            with open(tree / "lib/m001.py", "r+b") as f:
                f.write(b"not the image's bytes")
            after = filler_mod.LayerFiller(tmp_path / "layer", meta, _DeadSource)
            after.readahead = False
            after.fill(good)
            assert (tree / "lib/m000.py").read_bytes() == entries[0][1]
            with pytest.raises(FillError):
                after.fill(bad)
            assert (tree / "lib/m001.py").stat().st_blocks == 0, "unverified bytes stayed in place"
            assert after.requests == 1  # only the file whose bytes did not verify
    finally:
        SYNCER.flush()


class _LyingMirrorFirst:
    """Two endpoints with the endpoint API of shim.endpoints.MirroredBlobSource: a mirror that
    serves wrong bytes of the right length, then the origin."""

    def __init__(self, blob: Path) -> None:
        good = blob.read_bytes()
        self.blobs = {"mirror": bytes(b ^ 0x5A for b in good), "origin": good}
        self.order = ["mirror", "origin"]
        self.rejected: list[str] = []
        self.reads: list[str] = []
        self._lock = threading.Lock()
        self._last = threading.local()

    def read_range(self, start: int, end: int) -> bytes:
        with self._lock:
            ep = self.order[0]
            self.reads.append(ep)
        self._last.endpoint = ep
        return self.blobs[ep][start:end]

    def last_origin(self) -> str:
        return self._last.endpoint

    def reject(self, endpoint: str) -> None:
        with self._lock:
            self.rejected.append(endpoint)
            self.order.remove(endpoint)
            self.order.append(endpoint)


def test_wrong_bytes_from_a_mirror_are_fetched_again_from_the_next_endpoint(tmp_path: Path) -> None:
    entries = _files(10)
    meta, filler, _, regs = _filler_with(tmp_path, entries)
    source = filler._source = _LyingMirrorFirst(tmp_path / "blob")
    filler.fill(regs["lib/m000.py"])  # the open gets the image's bytes, not EIO
    _wait_idle(filler)
    for name in sorted(regs):
        if not filler.is_filled(regs[name]):
            filler.fill(regs[name])
    data = dict((ti.name, d) for ti, d in entries)
    assert all((tmp_path / "layer/tree" / n).read_bytes() == data[n] for n in regs)
    assert source.rejected and set(source.rejected) == {"mirror"}
    assert source.reads[0] == "mirror" and source.reads[-1] == "origin"


def test_wrong_bytes_from_every_endpoint_fail_the_fill(tmp_path: Path) -> None:
    entries = _files(3)
    meta, filler, _, regs = _filler_with(tmp_path, entries)
    source = filler._source = _LyingMirrorFirst(tmp_path / "blob")
    source.blobs["origin"] = source.blobs["mirror"]
    filler.readahead = False
    with pytest.raises(FillError, match="does not match its digest|corrupt"):
        filler.fill(regs["lib/m001.py"])
    assert len(source.rejected) == filler_mod.RETRY_SOURCES
    assert (tmp_path / "layer/tree/lib/m001.py").stat().st_blocks == 0, "an unverified byte stayed"


def test_a_start_up_set_is_claimed_at_once_and_requested_first_need_first(tmp_path: Path) -> None:
    entries = [reg(f"lib/m{i:03d}.py", os.urandom(100_000)) for i in range(6)]
    meta, filler, source, regs = _filler_with(tmp_path, entries)
    need = [regs["lib/m005.py"], regs["lib/m000.py"], regs["lib/m003.py"]]
    claimed_before_any_read: list[bool] = []

    def on_claimed() -> None:
        claimed_before_any_read.append(not source.reads and all(i in filler._inflight for i in need))

    assert filler.prefetch(need, lambda: None, gap=0, max_request=150_000, on_claimed=on_claimed,
                           need_order=True) == 0
    assert claimed_before_any_read == [True]
    spans = {i: meta.table.span(i) for i in need}
    assert source.reads == [spans[i] for i in need]  # one request per file here, in need order
    for ti, data in entries:
        if regs[ti.name] in need:
            assert (tmp_path / "layer/tree" / ti.name).read_bytes() == data


def test_a_file_asked_for_by_name_reads_no_neighbours(tmp_path: Path) -> None:
    meta, filler, source, regs = _filler_with(tmp_path, _files(10))
    filler.fill(regs["lib/m000.py"], neighbours=False)  # a prefill (/etc/passwd): no miss, no locality
    _wait_idle(filler)
    assert len(source.reads) == 1
    assert [n for n, i in regs.items() if filler.is_filled(i)] == ["lib/m000.py"]


def test_a_big_miss_has_the_link_to_itself_before_its_neighbours_come(tmp_path: Path) -> None:
    big = reg("lib/a-big.so", os.urandom(filler_mod.AHEAD_AFTER + 4096))
    meta, filler, source, regs = _filler_with(tmp_path, [big, *_files(10)])
    times: list[tuple[int, float, float]] = []
    plain = source.read_range
    idx = regs["lib/a-big.so"]
    own_start = meta.table.span(idx)[0]
    another = threading.Event()

    def timed(start: int, end: int) -> bytes:
        t0 = time.monotonic()
        if start == own_start:
            another.wait(0.5)  # a window to be caught in: a neighbour's request sent beside this one
        else:
            another.set()
        data = plain(start, end)
        times.append((start, t0, time.monotonic()))
        return data
    source.read_range = timed  # type: ignore[method-assign]
    filler.fill(idx)
    _wait_idle(filler)
    own = next(t for t in times if t[0] == own_start)
    others = [t for t in times if t[0] != own_start]
    assert others and all(t[1] >= own[2] for t in others), times
    assert all(filler.is_filled(i) for i in regs.values())


def test_a_missed_file_of_a_few_mb_comes_in_parallel_sub_ranges(tmp_path: Path) -> None:
    """An exec waits on one big file (python3.11: 2.9 MB compressed): several connections ramp
    up together, and what is verified and written is the whole file, exactly."""
    data = os.urandom(filler_mod.SPLIT_FROM * 2 + 12345)
    meta, filler, source, regs = _filler_with(tmp_path, [reg("usr/bin/big", data)])
    idx = regs["usr/bin/big"]
    start, end = meta.table.span(idx)
    filler.fill(idx, neighbours=False)
    assert len(source.reads) > 1, source.reads
    assert min(s for s, _ in source.reads) == start and max(e for _, e in source.reads) == end
    assert sum(e - s for s, e in source.reads) == end - start  # parts, not overlapping requests
    assert (tmp_path / "layer/tree/usr/bin/big").read_bytes() == data
