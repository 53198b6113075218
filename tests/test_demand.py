"""The demand board: the supervisor and the FUSE layer of big files see each other's on-demand
fetches, and each background yields to both (`shim.demand`)."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path

from test_bigfs import CHUNK, DATA, _bigfile, _layer
from test_fills import FakeFiller, _service

from shim.bigfs import warm
from shim.demand import BIG_FILES, SUPERVISOR, DemandBoard, open_board


def test_each_process_sees_the_others_fetches_never_its_own(tmp_path: Path) -> None:
    path = tmp_path / "demand"
    sup, big = DemandBoard(path, SUPERVISOR), DemandBoard(path, BIG_FILES)
    assert sup.others_last() == 0.0 and big.others_last() == 0.0  # nobody fetched yet
    sup.busy()
    assert big.others_last() == math.inf and sup.others_last() == 0.0
    sup.idle(123.5)
    assert big.others_last() == 123.5
    big.busy()
    assert sup.others_last() == math.inf and big.others_last() == 123.5


def test_a_damaged_board_reads_as_busy_not_as_quiet_for_ever(tmp_path: Path) -> None:
    path = tmp_path / "demand"
    big = DemandBoard(path, BIG_FILES)
    for bad in (math.nan, -1.0):
        with open(path, "r+b") as f:
            f.write(struct.pack("=d", bad))
        assert big.others_last() == math.inf
    os.truncate(path, 3)  # shorter than the board: the next opener makes it whole again
    assert DemandBoard(path, SUPERVISOR).others_last() == 0.0


def test_without_a_board_or_with_one_that_cannot_open_each_process_paces_alone(tmp_path: Path) -> None:
    logs: list[str] = []
    assert open_board(None, SUPERVISOR, logs.append) is None and logs == []
    assert open_board(tmp_path / "no" / "such" / "dir", SUPERVISOR, logs.append) is None
    assert len(logs) == 1 and "yields to this process's readers only" in logs[0]


def test_the_supervisor_publishes_its_on_demand_fills(tmp_path: Path) -> None:
    svc, _ = _service(tmp_path)
    svc.demand = DemandBoard(tmp_path / "demand", SUPERVISOR)
    big = DemandBoard(tmp_path / "demand", BIG_FILES)
    seen: list[float] = []
    filler = FakeFiller()
    real_fill = filler.fill
    filler.fill = lambda idx, neighbours=True: (seen.append(big.others_last()), real_fill(idx, neighbours))
    svc._fill(filler, 3)
    assert seen == [math.inf]  # while it ran
    assert big.others_last() == svc._last_ondemand > 0  # when it ended
    svc.record.close()


def test_the_big_files_background_is_not_quiet_while_the_supervisor_fills(tmp_path: Path) -> None:
    readers = warm.Readers(DemandBoard(tmp_path / "demand", BIG_FILES))
    sup = DemandBoard(tmp_path / "demand", SUPERVISOR)
    assert readers.quiet()
    sup.busy()
    assert not readers.quiet()
    sup.idle(0.001)  # long ago
    assert readers.quiet()
    with readers.fetching():  # and its own reads reach the supervisor
        assert sup.others_last() == math.inf
        assert not readers.quiet()
    assert sup.others_last() > 0 and not readers.quiet()  # just ended: not for QUIET yet


def test_a_paced_chunk_stops_between_pieces_for_a_reader_and_goes_on_with_what_it_had(tmp_path: Path) -> None:
    entry, src = _layer()
    f = _bigfile(tmp_path, entry, src)
    c = entry.chunks[1]
    piece = (c.end - c.offset) // 3 + 1
    have = f.ensure_paced(1, b"", piece, lambda: False)  # a reader came after the first piece
    assert have is not None and len(have) == piece and not f.verified[1]
    assert os.pread(f.fd, CHUNK, c.file_offset) == bytes(CHUNK)  # nothing cached unverified
    assert f.ensure_paced(1, have, piece, lambda: True) is None and f.verified[1]
    assert src.requests == [(c.offset, c.offset + piece), (c.offset + piece, c.offset + 2 * piece),
                            (c.offset + 2 * piece, c.end)]  # each byte once, in order
    assert os.pread(f.fd, CHUNK, c.file_offset) == DATA[c.file_offset: c.file_offset + CHUNK]
    assert f.ensure_paced(1, b"", piece, lambda: True) is None and len(src.requests) == 3  # done: no fetch


def test_a_paced_chunk_whose_pieces_lie_is_fetched_again_never_cached_wrong(tmp_path: Path) -> None:
    entry, src = _layer()
    f = _bigfile(tmp_path, entry, src)
    c = entry.chunks[2]
    src.tamper = lambda data: bytes(len(data)) if len(data) < c.end - c.offset else data  # the pieces lie
    assert f.ensure_paced(2, b"", (c.end - c.offset) // 2 + 1, lambda: True) is None
    assert os.pread(f.fd, CHUNK, c.file_offset) == DATA[c.file_offset: c.file_offset + CHUNK]
    assert src.requests[-1] == (c.offset, c.end)  # the whole chunk in one request, which told the truth
