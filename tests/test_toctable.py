"""TocTable: the columnar TOC, against the object form it stands for."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim.formats.toc import MAX_ENTRIES, Chunk, Entry, FormatError, build_toc
from shim.formats.toctable import TocTable

D = "sha256:" + "a" * 64
E = "sha256:" + "b" * 64


def rich_entries() -> list[Entry]:
    return [
        Entry(name="", type="dir", mode=0o755),
        Entry(name="etc", type="dir", mode=0o750, uid=7, gid=8, mtime=1_600_000_000, xattrs={"user.k": b"\0v"}),
        Entry(name="etc/f", type="reg", size=10, digest=D, chunks=[Chunk(100, 150, 0, 0, 10, D)]),
        Entry(name="etc/big", type="reg", size=30, digest=E, mtime=-5, chunks=[
            Chunk(150, 200, 0, 0, 10, D), Chunk(0, 0, 0, 10, 10, None, True), Chunk(200, 260, 3, 20, 10, E)]),
        Entry(name="etc/empty", type="reg", mode=0o4755),
        Entry(name="etc/hl", type="hardlink", link="etc/f", size=10),
        Entry(name="etc/sl", type="symlink", link="/abs/\u00e9t\u00e9"),
        Entry(name="dev/c", type="char", dev_major=5, dev_minor=1, uid=(1 << 32) - 2),
        Entry(name="dev/b", type="block", dev_major=8),
        Entry(name="dev/p", type="fifo"),
    ]


def test_round_trip_equals_the_object_form():
    entries = rich_entries()
    table = TocTable.from_entries(entries, prioritized=2, no_prefetch=True)
    again = TocTable.from_buffer(table.to_bytes())
    assert list(table) == entries and list(again) == entries and again == entries
    assert (again.prioritized, again.no_prefetch, len(again)) == (2, True, len(entries))
    assert again[-1] == entries[-1] and again[1:3] == entries[1:3]
    with pytest.raises(IndexError):
        again[len(entries)]


def test_columns_answer_without_objects():
    table = TocTable.from_buffer(TocTable.from_entries(rich_entries()).to_bytes())
    assert table.data_files() == [2, 3]
    assert table.span(2) == (100, 150) and table.span(3) == (150, 260) and table.span(4) == (0, 0)
    assert [table.type_of(i) for i in (0, 2, 5, 6)] == ["dir", "reg", "hardlink", "symlink"]
    assert table.name(6) == "etc/sl" and table.link(6) == "/abs/\u00e9t\u00e9" and table.digest_of(3) == E
    assert table.xattrs(1) == {"user.k": b"\0v"} and list(table.names())[:2] == ["", "etc"]
    assert table.size[3] == 30 and table.kind[0] == 0


def test_build_toc_makes_a_table():
    raw = [{"name": "./", "type": "dir"}, {"name": "a", "type": "reg", "size": 4, "offset": 10, "digest": D},
           {"name": "b", "type": "hardlink", "linkName": "a"}]
    toc = build_toc(iter(raw), 100)  # a generator: what a streaming parse hands over
    assert isinstance(toc.entries, TocTable)
    assert [e.name for e in toc.entries] == ["", "a", "b"] and toc.entries[2].link == "a"
    assert toc.entries[1].chunks == [Chunk(10, 100, 0, 0, 4, None)]


def test_entry_count_is_bounded_while_streaming():
    def many():
        yield {"name": "./", "type": "dir"}
        for i in range(MAX_ENTRIES + 5):
            yield {"name": f"d{i}", "type": "dir"}

    with pytest.raises(FormatError, match="more than"):
        build_toc(many(), 0)


def _corrupt(raw: bytes, offset: int, value: bytes) -> bytes:
    return raw[:offset] + value + raw[offset + len(value):]


def test_damaged_buffers_are_refused():
    raw = TocTable.from_entries(rich_entries()).to_bytes()
    n = len(rich_entries())
    bad = [
        b"", raw[:20], raw[:-1], raw + b"x", b"X" + raw[1:],
        _corrupt(raw, 8, struct.pack("<Q", 1 << 40)),  # entry count
        _corrupt(raw, 32, struct.pack("<Q", n + 1)),  # prioritized beyond the entries
    ]
    # name_off of entry 0 far past the pool: find the column from the layout (after the 2-byte ones)
    for b in bad:
        with pytest.raises(FormatError):
            TocTable.from_buffer(b)


def test_a_reference_outside_the_pool_is_refused():
    entries = rich_entries()
    table = TocTable.from_entries(entries)
    table.name_off[3] = 1 << 40
    with pytest.raises(FormatError, match="outside"):
        TocTable.from_buffer(table.to_bytes())
    table = TocTable.from_entries(entries)
    table.kind[0] = 99
    with pytest.raises(FormatError, match="outside"):
        TocTable.from_buffer(table.to_bytes())


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_escape_as_other_errors(data: bytes):
    raw = TocTable.from_entries(rich_entries()).to_bytes()
    for buf in (data, raw[:len(data)] + data[len(data) // 2:]):
        try:
            table = TocTable.from_buffer(buf)
        except FormatError:
            continue
        for i in range(len(table)):
            try:
                table[i]
            except (FormatError, UnicodeDecodeError):
                pass
