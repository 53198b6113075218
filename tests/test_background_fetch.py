"""Background fetch that yields: the measured rate, request sizes, waiting for quiet, pacing (pure,
`shim.pacing`), which files a layer hands the background next (near misses first), readahead in
pieces, and the fill service's loop over them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import reg
from test_fill_pipeline import _filler_with, _wait_idle

from shim import pacing
from shim.pacing import Pacer, RateMeter, is_quiet, request_size


def test_the_rate_counts_busy_time_once_and_ignores_idle_gaps() -> None:
    m = RateMeter()
    assert m.rate() is None
    m.record(10.0, 10.1, 1_000_000)
    m.record(10.05, 10.2, 1_000_000)  # overlaps the first: 0.2 s busy in all
    assert m.rate() == pytest.approx(2_000_000 / 0.2)
    m.record(50.0, 50.1, 1_000_000)  # 40 s idle before: not counted
    assert m.rate() == pytest.approx(3_000_000 / 0.3)


def test_the_rate_forgets_old_traffic() -> None:
    m = RateMeter()
    m.record(0.0, 1.0, 1_000)  # a slow start
    t = 1.0
    for _ in range(40):
        m.record(t, t + 0.1, 1_000_000)
        t += 0.1
    assert m.rate() > 9_000_000  # the recent 10 MB/s dominate


def test_requests_are_sized_by_the_rate_within_bounds() -> None:
    assert request_size(None) == 2 * pacing.MIN_REQUEST
    assert request_size(1_000) == pacing.MIN_REQUEST
    assert request_size(12.5e6) == int(12.5e6 * pacing.REQUEST_SECONDS)
    assert request_size(1e10) == pacing.MAX_REQUEST


def test_the_background_waits_for_quiet() -> None:
    assert is_quiet(0, 0.0, 5.0)  # no miss yet
    assert not is_quiet(1, 0.0, 5.0)  # one running
    assert not is_quiet(0, 5.0 - pacing.QUIET / 2, 5.0)
    assert is_quiet(0, 5.0 - pacing.QUIET, 5.0)


def test_the_pacer_leaves_room_below_the_rate() -> None:
    p = Pacer(share=0.5)
    assert p.delay(0.0) == 0
    p.sent(0.0, 1_000_000, 10_000_000)  # 0.1 s of the link at full rate: 0.2 s at half
    assert p.delay(0.0) == pytest.approx(0.2)
    assert p.delay(0.15) == pytest.approx(0.05)
    p.sent(1.0, 1_000_000, None)  # no rate measured yet: no pacing
    assert p.delay(1.0) == 0


def _layer(tmp_path: Path, n: int = 60):
    entries = [reg(f"lib/m{i:03d}.py", os.urandom(2000) + b"y" * 2000) for i in range(n)]
    return _filler_with(tmp_path, entries)


def test_the_background_takes_the_files_past_a_miss_first_then_sweeps(tmp_path: Path) -> None:
    meta, filler, source, regs = _layer(tmp_path)
    filler.readahead = False
    allowed = bytearray(b"\1" * len(meta.toc.entries))
    order = [regs[f"lib/m{i:03d}.py"] for i in range(60)]
    filler.fill(order[30])  # the workload missed here
    claimed, near = filler.claim_background(allowed, 6_000, sweep=False)
    assert near and claimed and claimed[0] == order[31], "not the file just past the miss"
    assert all(filler._inflight.get(i) for i in claimed), "claimed before the request is sent"
    assert filler.fill_claimed(claimed) == 0
    assert all(filler.is_filled(i) for i in claimed)
    nxt, near = filler.claim_background(allowed, 6_000, sweep=False)
    assert near and nxt[0] == order[order.index(claimed[-1]) + 1], "the stream past the miss goes on"
    filler.release(nxt)
    # Without a sweep nothing far from a miss is taken; with one, the layer's start comes next.
    filler._hot.clear()
    assert filler.claim_background(allowed, 6_000, sweep=False) == ([], False)
    far, near = filler.claim_background(allowed, 6_000)
    assert not near and far[0] == order[0]
    filler.release(far)


def test_the_background_skips_claimed_filled_and_other_files_and_ends(tmp_path: Path) -> None:
    meta, filler, source, regs = _layer(tmp_path, 12)
    filler.readahead = False
    order = [regs[f"lib/m{i:03d}.py"] for i in range(12)]
    allowed = bytearray(len(meta.toc.entries))
    for i in order[:10]:
        allowed[i] = 1  # m010, m011: not the background's (e.g. the start-up set's)
    filler.fill(order[0])
    seen: list[int] = []
    while True:
        claimed, _ = filler.claim_background(allowed, 1 << 20)
        if not claimed:
            break
        assert not set(claimed) & set(seen), "a file handed out twice"
        seen += claimed
        assert filler.fill_claimed(claimed) == 0
    _wait_idle(filler)
    assert sorted(seen) == sorted(order[1:10])
    assert not filler.is_filled(order[10]) and not filler.is_filled(order[11])
    assert len(source.reads) == 2, source.reads  # the miss, then one request for the other nine


def test_a_background_file_that_fails_is_retried_once_and_never_served(tmp_path: Path) -> None:
    meta, filler, source, regs = _layer(tmp_path, 6)
    bad = meta.toc.entries[regs["lib/m003.py"]]
    blob = bytearray((tmp_path / "blob").read_bytes())
    blob[(bad.chunks[0].offset + bad.chunks[0].end) // 2] ^= 0xFF
    (tmp_path / "blob").write_bytes(bytes(blob))
    allowed = bytearray(b"\1" * len(meta.toc.entries))
    failed = 0
    for _ in range(10):
        claimed, _ = filler.claim_background(allowed, 1 << 20)
        if not claimed:
            break
        failed += filler.fill_claimed(claimed)
    assert failed == 2  # the first pass and the retry
    assert not filler.is_filled(regs["lib/m003.py"])
    assert (tmp_path / "layer/tree/lib/m003.py").stat().st_blocks == 0
    assert filler.is_filled(regs["lib/m004.py"])


def test_a_big_window_is_read_in_pieces_in_blob_order(tmp_path: Path) -> None:
    entries = [reg(f"lib/big{i:02d}.so", os.urandom(300_000)) for i in range(12)]
    meta, filler, source, regs = _filler_with(tmp_path, entries)
    allowed = bytearray(b"\1" * len(meta.toc.entries))
    claimed, _ = filler.claim_background(allowed, 16 << 20)
    assert len(claimed) == 12
    filler._read_ahead(claimed)
    _wait_idle(filler)
    assert all(filler.is_filled(i) for i in claimed)
    assert 3 <= len(source.reads) <= 5, source.reads  # ~3.6 MB in pieces of about 1 MiB
    reads = sorted(source.reads)
    assert all(b[0] >= a[1] for a, b in zip(reads, reads[1:], strict=False)), "a byte fetched twice"
    assert reads[0][0] == min(c.offset for i in claimed for c in meta.toc.entries[i].chunks)
    for ti, data in entries:
        assert (tmp_path / "layer/tree" / ti.name).read_bytes() == data


def test_a_batch_commits_the_file_an_open_waits_for_first(tmp_path: Path) -> None:
    meta, filler, source, regs = _layer(tmp_path, 5)
    live = [regs[f"lib/m{i:03d}.py"] for i in range(5)]
    filler._wanted.add(live[3])
    order = []
    while live:
        order.append(filler._next_commit(live))
    assert order[0] == regs["lib/m003.py"]
    assert order[1:] == [regs[f"lib/m{i:03d}.py"] for i in (0, 1, 2, 4)]


def test_only_files_close_past_a_miss_are_near(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shim.store import filler as filler_mod

    meta, filler, source, regs = _layer(tmp_path)
    filler.readahead = False
    entries = meta.toc.entries
    # The window past the miss ends just inside m033: m033 is near, m034 is not.
    monkeypatch.setattr(filler_mod, "NEAR_MISS", entries[regs["lib/m033.py"]].chunks[0].offset + 1
                        - entries[regs["lib/m030.py"]].chunks[0].end)
    allowed = bytearray(b"\1" * len(meta.toc.entries))
    filler.fill(regs["lib/m030.py"])
    near: list[int] = []
    while True:
        claimed, is_near = filler.claim_background(allowed, 1, sweep=False)  # one file per claim
        if not claimed:
            break
        assert is_near
        near += claimed
    assert near == [regs[f"lib/m{i:03d}.py"] for i in (31, 32, 33)]
    filler.release(near)


class _Root:
    """The two things a FillService asks its lazy root for before any fill."""

    def complete(self, recount: bool = True) -> bool:
        return False

    def lookup(self, *args):
        return None


def test_the_rest_is_fetched_past_the_miss_first_then_swept(tmp_path: Path) -> None:
    from shim.supervisor.fills import FillService

    meta, filler, source, regs = _layer(tmp_path, 40)
    filler.readahead = False
    service = FillService(_Root(), log=lambda line: None)  # type: ignore[arg-type]
    order = [regs[f"lib/m{i:03d}.py"] for i in range(40)]
    filler.fill(order[20])
    assert service._fetch_rest([(filler, order[:35])]) == 0
    assert all(filler.is_filled(i) for i in order[:35])
    assert not any(filler.is_filled(i) for i in order[35:]), "a file outside the plan was fetched"
    # The files past the miss went first, then the sweep from the layer's start.
    firsts = [start for start, _ in source.reads[1:]]
    past_miss = meta.toc.entries[order[21]].chunks[0].offset
    assert firsts[0] == past_miss
    assert len(source.reads) < 12, source.reads  # a few requests, not one per file
