"""A layer's metadata on disk: a small record, its TocTable mapped read-only, v1 records still read."""

from __future__ import annotations

import mmap
from pathlib import Path

import cbor2
import pytest

from shim.errors import LazyshimError
from shim.formats.toc import Chunk, Entry, Toc
from shim.formats.toctable import TocTable
from shim.lazyroot import LazyRoot, _inode_index
from shim.store.layouts import read_meta, write_meta
from shim.store.metadata import LayerMeta

D = "sha256:" + "c" * 64


def _meta() -> LayerMeta:
    entries = [
        Entry(name="", type="dir"),
        Entry(name="a", type="reg", size=3, digest=D, chunks=[Chunk(0, 40, 0, 0, 3, D)]),
        Entry(name="l", type="symlink", link="a"),
        Entry(name="x", type="reg", xattrs={"user.y": b"1"}),
    ]
    return LayerMeta(digest="sha256:" + "d" * 64, format="estargz", blob_size=100, toc=Toc(entries, prioritized=1),
                     toc_digest=D, registry="r:5000", repository="repo", inodes=[0, 77, 0, 78])


def test_written_metadata_reads_back_over_a_map(tmp_path: Path) -> None:
    meta = _meta()
    write_meta(tmp_path, meta)
    back = read_meta(tmp_path)
    assert list(back.toc.entries) == list(meta.toc.entries) and back.toc.prioritized == 1
    assert (back.registry, back.repository, back.toc_digest, back.blob_size) == ("r:5000", "repo", D, 100)
    assert isinstance(back.table._buf, mmap.mmap)  # shared page cache, not a decoded copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inodes", "meta.cbor", "toc.table"]


def test_a_record_of_the_inline_version_still_loads(tmp_path: Path) -> None:
    """Stores written before tables keep working (their entries become a table in memory)."""
    meta = _meta()
    entries = [[e.name, e.type, e.mode, e.uid, e.gid, e.size, e.mtime, e.link, e.dev_major, e.dev_minor,
                e.xattrs or None, e.digest,
                [[c.offset, c.end, c.inner_offset, c.file_offset, c.size, c.digest, c.zeros] for c in e.chunks] or None]
               for e in meta.toc.entries]
    (tmp_path / "meta.cbor").write_bytes(cbor2.dumps({
        "v": 1, "digest": meta.digest, "format": "estargz", "blob_size": 100, "toc_digest": D, "complete": False,
        "prioritized": 1, "no_prefetch": False, "entries": entries, "inodes": [0, 77, 0, 78], "registry": "r",
        "repository": "p"}))
    back = read_meta(tmp_path)
    assert list(back.toc.entries) == list(meta.toc.entries) and list(back.inodes) == [0, 77, 0, 78]


@pytest.mark.parametrize("damage", ["truncate", "missing", "garbage", "count"])
def test_a_damaged_table_is_one_line(tmp_path: Path, damage: str) -> None:
    write_meta(tmp_path, _meta())
    table = tmp_path / "toc.table"
    if damage == "truncate":
        table.write_bytes(table.read_bytes()[:-3])
    elif damage == "missing":
        table.unlink()
    elif damage == "garbage":
        table.write_bytes(b"\0" * 100)
    else:
        table.write_bytes(TocTable.from_entries(list(_meta().toc.entries)[:2], prioritized=1).to_bytes())
    with pytest.raises(LazyshimError) as e:
        read_meta(tmp_path)
    assert "\n" not in str(e.value)


def test_inode_index_finds_files_by_bisect() -> None:
    keys, slots = _inode_index([[0, 900, 0, 12], [5, 0, 1 << 40]])
    assert list(keys) == [5, 12, 900, 1 << 40]
    root = object.__new__(LazyRoot)
    root.fillers = ["lower", "upper"]
    root._inodes, root._slots = keys, slots
    assert root.entry_of_inode(900) == ("lower", 1) and root.entry_of_inode(12) == ("lower", 3)
    assert root.entry_of_inode(5) == ("upper", 0) and root.entry_of_inode(1 << 40) == ("upper", 2)
    assert root.entry_of_inode(6) is None and root.entry_of_inode(0) is None and root.entry_of_inode(1 << 41) is None


def test_the_same_inode_in_two_layers_is_the_upper_ones() -> None:
    keys, slots = _inode_index([[7], [7]])
    root = object.__new__(LazyRoot)
    root.fillers = ["lower", "upper"]
    root._inodes, root._slots = keys, slots
    assert root.entry_of_inode(7) == ("upper", 0)


def test_the_supervisor_heap_settings_apply_here() -> None:
    from shim.supervisor.heap import bound_heap

    assert bound_heap()  # glibc: large buffers are mapped on their own, two arenas
