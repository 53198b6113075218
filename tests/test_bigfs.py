"""The FUSE layer of big files in-process: which files it serves, and that a chunk reaches a
reader only verified, fetched once, from the chunks the read touches (no mount needed)."""

from __future__ import annotations

import errno
import os
import random
import tarfile
from pathlib import Path

import pytest

from shim.bigfs import is_big
from shim.bigfs.chunked import BigFile, ChunkError
from shim.formats import estargz
from shim.formats.estargz_writer import build_estargz
from shim.formats.toc import Chunk, Entry

CHUNK = 64 << 10
DATA = random.Random(7).randbytes(5 * CHUNK + 123)


class CountingSource:
    """A blob in memory that counts range requests; `tamper` rewrites what it serves."""

    def __init__(self, blob: bytes) -> None:
        self.blob = blob
        self.requests: list[tuple[int, int]] = []
        self.tamper = None

    def read_range(self, start: int, end: int) -> bytes:
        self.requests.append((start, end))
        data = self.blob[start:end]
        return self.tamper(data) if self.tamper else data


def _layer(data: bytes = DATA) -> tuple[Entry, CountingSource]:
    ti = tarfile.TarInfo("model/weights.bin")
    ti.size = len(data)
    layer = build_estargz([(ti, data)], chunk_size=CHUNK)
    footer = layer.blob[-51:]
    toc_offset, _ = estargz.parse_footer(footer)
    toc = estargz.parse_toc(layer.toc_json, toc_offset)
    entry = next(e for e in toc.entries if e.type == "reg")
    return entry, CountingSource(layer.blob)


def _bigfile(tmp_path: Path, entry: Entry, source: CountingSource, done=None) -> BigFile:
    fd = os.open(tmp_path / "partial", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, entry.size)
    return BigFile(entry, "estargz", lambda: source, fd, done)


def test_only_chunked_files_with_digests_above_the_threshold_are_big() -> None:
    entry, _ = _layer()
    assert len(entry.chunks) == 6 and is_big(entry, 4 * CHUNK)
    assert not is_big(entry, 0)  # off
    assert not is_big(entry, len(DATA) + 1)  # too small
    one = Entry("f", "reg", size=entry.size, chunks=[Chunk(0, 10, 0, 0, entry.size, "sha256:" + "0" * 64)])
    assert not is_big(one, 1)  # one chunk: a whole-file fill
    entry.chunks[2].digest = None
    assert not is_big(entry, 1)  # a chunk that cannot be verified alone


def test_a_read_fetches_the_chunks_it_touches_once(tmp_path: Path) -> None:
    entry, src = _layer()
    f = _bigfile(tmp_path, entry, src)
    assert f.read(CHUNK - 10, 20) == DATA[CHUNK - 10: CHUNK + 10]  # across a chunk boundary
    assert len(src.requests) == 2
    assert f.read(CHUNK + 5, 100) == DATA[CHUNK + 5: CHUNK + 105]
    assert len(src.requests) == 2  # cached and verified in this process
    assert f.read(len(DATA) - 50, 4096) == DATA[-50:]  # short at the end of the file
    assert f.read(len(DATA), 10) == b""
    assert len(src.requests) == 3 and f.chunks_fetched == 3


@pytest.mark.parametrize("how", ["flipped", "other-content"])
def test_a_chunk_that_fails_verification_is_an_error_and_never_cached(tmp_path: Path, how: str) -> None:
    entry, src = _layer()
    if how == "flipped":
        src.tamper = lambda data: bytes(b ^ 0x5A for b in data)
    else:  # a valid member of other bytes of the same size
        wrong, other = _layer(bytes(len(DATA)))
        src.tamper = lambda data: other.blob[wrong.chunks[1].offset: wrong.chunks[1].end]
    f = _bigfile(tmp_path, entry, src)
    with pytest.raises(ChunkError):
        f.read(CHUNK + 1, 10)
    with pytest.raises(OSError) as e:
        os.lseek(f.fd, 0, os.SEEK_DATA)  # nothing was written: still all hole
    assert e.value.errno == errno.ENXIO
    src.tamper = None
    assert f.read(CHUNK + 1, 10) == DATA[CHUNK + 1: CHUNK + 11]  # the next read tries again


def test_a_second_process_reverifies_cached_chunks_instead_of_refetching(tmp_path: Path) -> None:
    entry, src = _layer()
    _bigfile(tmp_path, entry, src).read(0, 3 * CHUNK)
    first = len(src.requests)
    again = _bigfile(tmp_path, entry, src)
    assert again.read(10, 2 * CHUNK) == DATA[10: 2 * CHUNK + 10]
    assert len(src.requests) == first
    # A cached chunk that no longer matches (a torn write, tampering) is fetched again.
    fd = os.open(tmp_path / "partial", os.O_RDWR)
    os.pwrite(fd, b"X" * 10, 2 * CHUNK + 5)
    os.close(fd)
    third = _bigfile(tmp_path, entry, src)
    assert third.read(2 * CHUNK, 100) == DATA[2 * CHUNK: 2 * CHUNK + 100]
    assert len(src.requests) == first + 1


def test_the_last_verified_chunk_completes_the_file_once(tmp_path: Path) -> None:
    entry, src = _layer()
    done: list[BigFile] = []
    f = _bigfile(tmp_path, entry, src, done.append)
    f.read(0, 3 * CHUNK)
    assert done == []
    f.read(0, len(DATA))
    f.read(0, len(DATA))
    assert done == [f] and f.completed
    assert os.pread(f.fd, len(DATA), 0) == DATA


def test_the_fuse_operations_serve_object_names_read_only(tmp_path: Path) -> None:
    mfusepy = pytest.importorskip("mfusepy")
    from shim.bigfs.fs import BigFS

    entry, src = _layer()
    logged: list[str] = []
    fs = BigFS({"objects/ab/" + "ab" * 32: _bigfile(tmp_path, entry, src)}, logged.append)
    path = "/objects/ab/" + "ab" * 32
    assert fs.getattr(path)["st_size"] == len(DATA)
    assert fs.getattr("/objects")["st_mode"] & 0o170000 == 0o040000
    assert fs.readdir("/objects/ab", 0)[2:] == ["ab" * 32]
    for bad in ("/objects/ab/x", "/../etc/passwd", "/objects/cd"):
        with pytest.raises(mfusepy.FuseOSError) as e:
            fs.getattr(bad)
        assert e.value.errno == errno.ENOENT
    with pytest.raises(mfusepy.FuseOSError) as e:
        fs.open(path, os.O_RDWR)
    assert e.value.errno == errno.EROFS
    fh = fs.open(path, os.O_RDONLY)
    assert fs.read(path, 100, CHUNK, fh) == DATA[CHUNK: CHUNK + 100]
    src.tamper = lambda data: data[::-1]
    with pytest.raises(mfusepy.FuseOSError) as e:
        fs.read(path, 100, 4 * CHUNK, fh)
    assert e.value.errno == errno.EIO and "chunk 4" in logged[-1]


def test_a_complete_partial_becomes_the_object_and_gc_drops_unnamed_partials(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shim.store.layout import Store
    from shim.store.partials import collect, open_partial, partial_path, publish

    monkeypatch.setenv("LAZYSHIM_STORE_LAYOUT", "v2")
    store = Store(tmp_path / "store")
    name, gone = "objects/ab/" + "ab" * 32, "objects/cd/" + "cd" * 32
    fd = open_partial(store, name, 10)
    os.pwrite(fd, b"0123456789", 0)
    os.close(fd)
    os.close(open_partial(store, gone, 10))
    assert collect(store, {name}) == (1, 0)  # the unnamed one (all hole: no blocks)
    assert not partial_path(store, gone).exists() and partial_path(store, name).exists()
    publish(store, name)
    assert (store.root / "data" / name).read_bytes() == b"0123456789"
    assert not partial_path(store, name).exists()


def test_whether_a_layer_has_big_files_is_remembered(tmp_path: Path) -> None:
    from shim.store.layout import Store
    from shim.store.partials import largest_chunked

    store = Store(tmp_path / "store")
    digest = "sha256:" + "ab" * 32
    store.layer_dir(digest).mkdir(parents=True)
    calls: list[int] = []

    def compute() -> int:
        calls.append(1)
        return 123

    assert largest_chunked(store, digest, compute) == 123
    assert largest_chunked(store, digest, compute) == 123
    assert calls == [1]


def test_the_whole_file_digest_guards_what_becomes_an_object(tmp_path: Path) -> None:
    entry, src = _layer()
    f = _bigfile(tmp_path, entry, src)
    f.read(0, len(DATA))
    assert f.whole_digest_ok()
    entry.digest = "sha256:" + "0" * 64  # a TOC whose file digest names another content
    assert not f.whole_digest_ok()


def test_two_entries_claiming_one_digest_with_other_chunks_are_served_by_neither(tmp_path: Path,
                                                                                monkeypatch) -> None:
    from shim.bigfs import plan
    from shim.store.layout import Store
    from shim.store.metadata import LayerMeta

    monkeypatch.setenv("LAZYSHIM_STORE_LAYOUT", "v2")
    entry, _ = _layer()
    other, _ = _layer(bytes(len(DATA)))
    other.digest = entry.digest  # same object name, other content
    metas = {}
    for i, e in enumerate((entry, other, entry)):
        d = f"sha256:{i:064x}"
        m = LayerMeta.__new__(LayerMeta)
        m.digest, m.complete = d, False
        m.toc = type("T", (), {"entries": [e]})()
        metas[d] = m
    store = Store(tmp_path / "store")
    for d in metas:
        store.layer_dir(d).mkdir(parents=True)
    monkeypatch.setattr("shim.store.layouts.load_meta", lambda _s, d: metas[d])
    assert [s.meta.digest for s in plan.served(store, list(metas)[::2], 1)] == [list(metas)[0]]  # one name
    assert plan.served(store, list(metas), 1) == []


def test_the_threshold_is_configured_in_one_place_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from shim import bigfs, config
    from shim.errors import LazyshimError

    config.reload()
    monkeypatch.delenv("LAZYSHIM_BIG_FILE_THRESHOLD", raising=False)
    monkeypatch.setattr(config, "files", lambda: [])
    assert bigfs.threshold() == bigfs.DEFAULT_THRESHOLD == 16 << 20
    monkeypatch.setenv("LAZYSHIM_BIG_FILE_THRESHOLD", "0")
    assert bigfs.threshold() == 0
    for bad in ("lots", "-1"):
        monkeypatch.setenv("LAZYSHIM_BIG_FILE_THRESHOLD", bad)
        with pytest.raises(LazyshimError, match="big_file_threshold"):
            bigfs.threshold()


def test_without_fuse_big_files_are_filled_whole_and_that_is_said_once(monkeypatch, capsys) -> None:
    from runtime import bigmount
    from shim import bigfs

    monkeypatch.setattr(os, "access", lambda *_a, **_k: False)
    assert bigfs.fuse_unavailable() == "/dev/fuse is not usable"
    monkeypatch.setattr(bigmount, "_said_unavailable", False)
    bigmount._unavailable("no fuse here")
    bigmount._unavailable("no fuse here")
    assert capsys.readouterr().err == "lazyshim: no fuse here: big files are filled whole\n"


def test_a_chunk_is_fetched_in_parts_that_cover_it_exactly() -> None:
    from shim.store.splitread import MIN_PART, PARTS, parts

    assert parts(100, 100 + 4 * MIN_PART) == [(100 + i * MIN_PART, 100 + (i + 1) * MIN_PART) for i in range(4)]
    assert parts(0, MIN_PART + 1) == [(0, MIN_PART + 1)]  # too small to split
    got = parts(7, 7 + 10 * MIN_PART + 3)
    assert len(got) == PARTS and got[0][0] == 7 and got[-1][1] == 7 + 10 * MIN_PART + 3
    assert all(a[1] == b[0] for a, b in zip(got, got[1:], strict=False))


BIG_CHUNK = 2 << 20
BIG_DATA = random.Random(8).randbytes(2 * BIG_CHUNK)


def _big_layer() -> tuple[Entry, CountingSource]:
    ti = tarfile.TarInfo("model/weights.bin")
    ti.size = len(BIG_DATA)
    layer = build_estargz([(ti, BIG_DATA)], chunk_size=BIG_CHUNK)
    toc_offset, _ = estargz.parse_footer(layer.blob[-51:])
    entry = next(e for e in estargz.parse_toc(layer.toc_json, toc_offset).entries if e.type == "reg")
    return entry, CountingSource(layer.blob)


def test_a_big_chunk_comes_in_parts_and_a_lying_part_costs_a_refetch_not_a_wrong_byte(tmp_path: Path) -> None:
    entry, src = _big_layer()
    f = _bigfile(tmp_path, entry, src)
    c = entry.chunks[1]
    assert f.read(BIG_CHUNK + 3, 10) == BIG_DATA[BIG_CHUNK + 3: BIG_CHUNK + 13]
    assert len(src.requests) == 4 and sorted(src.requests)[0][0] == c.offset
    assert sum(e - s for s, e in src.requests) == c.end - c.offset
    # Parts after the first come from somewhere that lies: the chunk is fetched again in one request.
    del src.requests[:]
    entry0 = entry.chunks[0]
    served = src.read_range

    def lying(start: int, end: int) -> bytes:
        data = served(start, end)
        return data if start == entry0.offset else bytes(len(data))
    src.read_range = lying  # type: ignore[method-assign]
    assert f.read(5, 10) == BIG_DATA[5:15]
    assert src.requests[-1] == (entry0.offset, entry0.end)


# ---- chunks touched, prefetched, fetched in the background ----------------------------------
def test_each_chunk_s_first_touch_is_recorded_once_in_order_and_read_back(tmp_path: Path) -> None:
    from shim.bigfs.touched import Recorder, read

    a, b = ("model/a", "sha256:" + "a" * 64, 10 * CHUNK), ("model/b", "", 3 * CHUNK)
    rec = Recorder(tmp_path / "touched", [a, b], print)
    rec.touch(1, range(2, 3))
    rec.touch(0, range(4, 6))
    rec.touch(0, range(5, 7))
    rec.touch(1, range(2, 3))
    rec.touch(7, range(0, 1))  # not a file of the record: ignored
    assert read(tmp_path / "touched") == ([a, b], [(*b, [2]), (*a, [4, 5, 6])])
    assert read(tmp_path / "absent") is None


@pytest.mark.parametrize("tail", [
    b"t 0 99999\n",  # beyond the file's size
    b"t 5 1\n",  # no such file
    b"t 0 1\n",  # twice
    b"t x y\n",
    b"s [1, 2]\n",
    b"garbage\n",
])
def test_a_hostile_record_ends_where_it_stops_making_sense(tmp_path: Path, tail: bytes) -> None:
    from shim.bigfs.touched import read

    path = tmp_path / "touched"
    path.write_bytes(b's ["model/a", "", 4096]\nt 0 1\n' + tail + b"t 0 2\n")
    assert read(path) == ([("model/a", "", 4096)], [("model/a", "", 4096, [1])])


def test_the_fuse_read_records_the_chunks_it_touches(tmp_path: Path) -> None:
    pytest.importorskip("mfusepy")
    from shim.bigfs.fs import BigFS
    from shim.bigfs.touched import Recorder, read

    entry, src = _layer()
    key = (entry.name, entry.digest or "", entry.size)
    rec = Recorder(tmp_path / "touched", [key], print)
    fs = BigFS({"objects/ab/" + "ab" * 32: _bigfile(tmp_path, entry, src)}, print, recorder=rec)
    fh = fs.open("/objects/ab/" + "ab" * 32, os.O_RDONLY)
    fs.read("", 10, 3 * CHUNK + 5, fh)
    fs.read("", CHUNK + 20, CHUNK - 10, fh)  # across 0|1|2: 1 and 2 are new
    fs.read("", 10, 3 * CHUNK, fh)
    assert read(tmp_path / "touched") == ([key], [(*key, [3, 0, 1, 2])])


def test_the_profile_s_chunks_are_fetched_once_and_a_reader_waits_for_that_fetch(tmp_path: Path) -> None:
    import threading

    from shim.bigfs import warm

    entry, src = _layer()
    gate, entered = threading.Event(), threading.Event()
    c4 = entry.chunks[4]
    plain = src.read_range

    def held(start: int, end: int) -> bytes:
        if start == c4.offset:  # chunk 4's fetch waits until the reader is started
            entered.set()
            gate.wait(30)
        return plain(start, end)
    src.read_range = held
    f = _bigfile(tmp_path, entry, src)
    logs: list[str] = []
    plan = warm.profile_plan([f], [("other", "", 5, [0]), (entry.name, entry.digest or "", entry.size, [4, 1]),
                                   (entry.name, entry.digest or "", entry.size + 1, [2])], logs.append)
    assert plan == [(f, 4), (f, 1)]  # by digest and size: another file's entries are not this one's
    assert warm.profile_plan([f], [(entry.name, entry.digest or "", entry.size, [0, 99])], logs.append) == []
    assert "beyond" in logs[-1]
    t = threading.Thread(target=warm.prefetch, args=(plan, logs.append))
    t.start()
    assert entered.wait(30)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(f.read(c4.file_offset + 1, 10)))
    reader.start()  # chunk 4's lock is held by the prefetch: the reader cannot fetch it again
    gate.set()
    reader.join(30)
    t.join(30)
    assert got == [DATA[c4.file_offset + 1: c4.file_offset + 11]]
    assert sorted(src.requests) == sorted([(c4.offset, c4.end), (entry.chunks[1].offset, entry.chunks[1].end)])
    assert f.chunks_fetched == 2 and "2 chunks done" in logs[-1]


def test_the_background_completes_the_file_in_single_requests(tmp_path: Path) -> None:
    from shim.bigfs import warm

    entry, src = _layer()
    done: list[BigFile] = []
    f = _bigfile(tmp_path, entry, src, done.append)
    f.read(0, 10)
    readers = warm.Readers()
    readers.first_read.set()
    warm.background([f], readers, print)
    assert done == [f] and len(src.requests) == len(entry.chunks)
    assert os.pread(f.fd, len(DATA), 0) == DATA


def test_background_none_fetches_nothing_unasked(tmp_path: Path) -> None:
    from shim.bigfs import warm

    entry, src = _layer()
    f = _bigfile(tmp_path, entry, src)
    assert warm.start([f], [], False, warm.Readers(), print) is None
    assert src.requests == []


@pytest.mark.parametrize("elf", [True, False])
def test_an_elf_big_file_has_all_its_chunks_fetched_after_its_header_others_only_what_is_read(
        tmp_path: Path, elf: bool) -> None:
    pytest.importorskip("mfusepy")
    import threading as _threading

    from shim.bigfs.fs import BigFS

    data = (b"\x7fELF" if elf else b"\x93NUMPY") + DATA[6:]
    entry, src = _layer(data)
    f = _bigfile(tmp_path, entry, src)
    fs = BigFS({"objects/ab/" + "ab" * 32: f}, lambda _m: None)
    path = "/objects/ab/" + "ab" * 32
    fh = fs.open(path, os.O_RDONLY)
    assert fs.read(path, 64, 0, fh) == data[:64]  # the loader's (or numpy's) header read
    for t in [t for t in _threading.enumerate() if t.name == "chunk-dense"]:
        t.join(10)
    want = len(entry.chunks) if elf else 1
    assert sum(f.verified) == want and f.chunks_fetched == want
    assert fs.read(path, 100, 3 * CHUNK, fh) == data[3 * CHUNK: 3 * CHUNK + 100]  # verified bytes, either way
