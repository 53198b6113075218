"""Start-up profiles: the store's round trip and bounds, hostile files, matching a later tag by
path and content digest, and the learner's record in first-need order."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from shim.errors import LazyshimError
from shim.formats.toc import Entry
from shim.store import profiles
from shim.store.layout import Store
from shim.supervisor.learning import Learner

IMG_A = "sha256:" + "a" * 64
IMG_B = "sha256:" + "b" * 64
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def _profile(image: str = IMG_A, files=None, args=("python3", "-c", "x"), repo: str = "lib/py") -> profiles.Profile:
    return profiles.Profile(image, "reg.example:5000", repo, list(args), "/",
                            files if files is not None else [("usr/bin/python3", D1, 10), ("etc/passwd", "", 3)])


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "store")
    s.images.mkdir(parents=True)
    return s


def test_round_trip_keeps_order_and_fields(store: Store) -> None:
    p = _profile()
    path = profiles.save(store, p)
    got = profiles.load(path)
    assert got is not None
    assert got.files == p.files and got.args == p.args and got.cwd == "/" and got.image == IMG_A
    assert profiles.find(store, IMG_A, "reg.example:5000", "lib/py", p.args, "/").files == p.files
    assert profiles.parse_many(json.dumps([profiles.to_doc(p)]).encode())[0].files == p.files


def test_a_later_tag_finds_the_newest_profile_of_its_repository_and_command(store: Store) -> None:
    old = profiles.save(store, _profile(IMG_A))
    os.utime(old, (1, 1))
    profiles.save(store, _profile(IMG_B, files=[("usr/bin/python3", D2, 11)]))
    img_c = "sha256:" + "c" * 64
    found = profiles.find(store, img_c, "reg.example:5000", "lib/py", ["python3", "-c", "x"], "/")
    assert found is not None and found.image == IMG_B
    # Another command, or another repository: nothing.
    assert profiles.find(store, img_c, "reg.example:5000", "lib/py", ["python3"], "/") is None
    assert profiles.find(store, img_c, "reg.example:5000", "lib/other", ["python3", "-c", "x"], "/") is None


def _entry(name: str, digest: str | None = D1, size: int = 10, typ: str = "reg") -> Entry:
    return Entry(name=name, type=typ, size=size, digest=digest)


def test_matching_by_path_and_content_digest_topmost_layer_decides() -> None:
    files = [("usr/bin/python3", D1, 10), ("usr/lib/changed.py", D1, 10), ("etc/gone", D1, 10),
             ("usr/lib/same.py", D1, 10), ("no/digest", "", 5)]
    top = [_entry("usr/lib/changed.py", D2), _entry("etc/.wh.gone")]
    bottom = [_entry("etc/gone"), _entry("usr/lib/same.py"), _entry("usr/bin/python3"), _entry("usr/lib/changed.py"),
              _entry("no/digest", None, 5)]
    # In profile order; the changed file (top layer, new digest) and the whited-out one are skipped.
    assert profiles.match(files, [top, bottom]) == [(1, 2), (1, 1), (1, 4)]
    # A size mismatch, a directory of that name: no match.
    assert profiles.match([("usr/bin/python3", D1, 11)], [bottom]) == []
    assert profiles.match([("usr/bin/python3", D1, 10)], [[_entry("usr/bin/python3", typ="dir", size=0)], bottom]) == []


@pytest.mark.parametrize(("data", "words"), [
    (b"\0\1garbage", "not JSON"),
    (b"[" * 200_000, "not JSON"),
    (json.dumps({"v": 99}).encode(), "version"),
    (json.dumps({"v": 1, "image": "sha256:zz"}).encode(), "digest"),
    (json.dumps(dict(profiles.to_doc(_profile()), files=[["../../etc/shadow", "", 1]])).encode(), "bad file name"),
    (json.dumps(dict(profiles.to_doc(_profile()), files=[["/abs", "", 1]])).encode(), "bad file name"),
    (json.dumps(dict(profiles.to_doc(_profile()), files=[["a", "md5:x", 1]])).encode(), "bad digest"),
    (json.dumps(dict(profiles.to_doc(_profile()), files=[["a", "", -1]])).encode(), "bad size"),
    (json.dumps(dict(profiles.to_doc(_profile()), files=[["a", "", True]])).encode(), "bad size"),
    (json.dumps(dict(profiles.to_doc(_profile()), files=[["a", "", 1]] * (profiles.MAX_FILES + 1))).encode(),
     "at most"),
    (json.dumps(dict(profiles.to_doc(_profile()), command={"args": "sh"})).encode(), "command"),
    (b" " * (profiles.MAX_BYTES + 1), "larger than"),
])
def test_hostile_profiles_are_one_line_errors(data: bytes, words: str) -> None:
    with pytest.raises(LazyshimError, match=words) as e:
        profiles.parse(data)
    assert "\n" not in str(e.value)


def test_a_corrupt_or_huge_profile_file_is_ignored_with_one_log_line(store: Store) -> None:
    path = profiles.save(store, _profile())
    path.write_bytes(b"{" * (profiles.MAX_BYTES + 10))
    logs: list[str] = []
    assert profiles.find(store, IMG_A, "reg.example:5000", "lib/py", ["python3", "-c", "x"], "/", logs.append) is None
    assert len(logs) == 1 and "ignored" in logs[0]
    path.write_bytes(b"[" * 100_000)
    logs.clear()
    assert profiles.listing(store, logs.append) == [] and len(logs) == 1


def test_bounds_keep_the_newest_per_command(store: Store) -> None:
    paths = []
    for i in range(profiles.PER_COMMAND + 2):
        image = "sha256:" + f"{i:x}" * 64
        paths.append(profiles.save(store, _profile(image)))
        os.utime(paths[-1], (1000 + i, 1000 + i))
    profiles.save(store, _profile("sha256:" + "f" * 64))
    left = {p for p, _ in profiles.listing(store)}
    assert len(left) == profiles.PER_COMMAND
    assert paths[0] not in left and paths[1] not in left and paths[-1] in left


def test_profiles_of_removed_images_are_counted(store: Store) -> None:
    profiles.save(store, _profile(IMG_A))
    profiles.save(store, _profile(IMG_B))
    (store.images / "sha256-{}.cbor".format("a" * 64)).write_bytes(b"")
    assert profiles.of_removed_images(store) == 1


def test_merge_keeps_the_earlier_profile_only_when_the_run_was_cut_short() -> None:
    old = _profile(files=[("a", "", 1), ("b", "", 1), ("c", "", 1)])
    assert profiles.keep_or_merge([("b", "", 1)], old, cut_short=False) == [("b", "", 1)]
    assert profiles.keep_or_merge([("b", "", 1)], old, cut_short=True) == [("b", "", 1), ("a", "", 1), ("c", "", 1)]


def test_enabled_is_on_or_off() -> None:
    assert profiles.enabled(None) and profiles.enabled("on") and not profiles.enabled("off")
    with pytest.raises(LazyshimError, match="on or off"):
        profiles.enabled("maybe")


class _Filler:
    def __init__(self, entries: list[Entry]) -> None:
        self.meta = SimpleNamespace(toc=SimpleNamespace(entries=entries), digest=D1,
                                    table=SimpleNamespace(size=[e.size for e in entries]))
        self.done: set[int] = set()

    def is_filled(self, idx: int) -> bool:
        return idx in self.done


class _Root:
    """A LazyRoot's recording hook and layers, without trees."""

    recording = None
    recording_cap = 0

    def __init__(self, fillers: list[_Filler]) -> None:
        self.fillers = fillers
        self.metas = [f.meta for f in fillers]

    def look(self, filler: _Filler, idx: int) -> None:
        hit = (filler, idx)
        if self.recording is not None and hit not in self.recording:
            self.recording[hit] = None


def test_the_learner_saves_first_need_order_and_plans_the_next_run(store: Store) -> None:
    entries = [_entry("usr/bin/python3"), _entry("etc/passwd", D2, 3), _entry("usr/lib/x.py")]
    f = _Filler(entries)
    root = _Root([f])
    logs: list[str] = []
    learner = Learner(store, root, IMG_A, "reg.example:5000", "lib/py", ["python3"], "/", logs.append)
    assert learner.plan() == []
    for idx in (1, 0, 1, 2, 0):
        root.look(f, idx)
    learner.save()
    learner.save()  # nothing new: not written again
    assert sum("profile saved" in line for line in logs) == 1
    saved = profiles.find(store, IMG_A, "reg.example:5000", "lib/py", ["python3"], "/")
    assert [name for name, _, _ in saved.files] == ["etc/passwd", "usr/bin/python3", "usr/lib/x.py"]
    # The next run (another tag, same repository and command) plans what it holds and lacks.
    f2 = _Filler([_entry("usr/lib/x.py"), _entry("usr/bin/python3"), _entry("etc/passwd", D1, 3)])
    f2.done.add(0)
    nxt = Learner(store, _Root([f2]), IMG_B, "reg.example:5000", "lib/py", ["python3"], "/", logs.append)
    assert nxt.plan() == [(f2, [1])]  # passwd changed its digest, x.py is filled already


def test_profile_verb_is_a_store_verb() -> None:
    from runtime.oci import IMAGE_VERBS

    assert "profile" in IMAGE_VERBS


def test_the_lazy_root_notes_each_file_once_filled_or_not_up_to_its_cap() -> None:
    import stat

    from shim.lazyroot import LazyRoot, _inode_index

    filler = _Filler([_entry("a"), _entry("b"), _entry("c")])
    filler.done.add(1)
    root = LazyRoot.__new__(LazyRoot)
    root.fillers = [filler]
    root._inodes, root._slots = _inode_index([[10, 11, 12]])
    root.recording, root.recording_cap = {}, 2
    noted = root.recording

    def st(ino: int) -> os.stat_result:
        return os.stat_result((stat.S_IFREG | 0o644, ino, 0, 1, 0, 0, 10, 0, 0, 0))

    assert root.lookup(st(11)) is None  # filled: nothing to do, but needed all the same
    assert root.lookup(st(10)) == (filler, 0)
    assert root.lookup(st(11)) is None
    assert [idx for _, idx in noted] == [1, 0]
    assert root.recording is None  # the cap is reached: the answer path stops noting
    assert root.lookup(st(12)) == (filler, 2) and len(noted) == 2


# ---- big files' chunks ---------------------------------------------------------------------
BIG = ("model/weights.npy", D2, 64 << 20)


def test_touched_chunks_round_trip_in_first_touch_order(store: Store) -> None:
    p = _profile()
    p.chunks = [(*BIG, [5, 0, 9]), ("model/other.bin", "", 8 << 20, [1])]
    got = profiles.load(profiles.save(store, p))
    assert got is not None and got.chunks == p.chunks
    assert "chunks" not in profiles.to_doc(_profile())  # absent where none was touched


def _with_chunks(chunks) -> bytes:
    return json.dumps(dict(profiles.to_doc(_profile()), chunks=chunks)).encode()


@pytest.mark.parametrize("data,words", [
    (_with_chunks([[*BIG, list(range(profiles.MAX_CHUNKS + 1))]]), "more than"),
    (_with_chunks([[f"f{i}", "", 100, [0]] for i in range(profiles.MAX_CHUNK_FILES + 1)]), "at most"),
    (_with_chunks([[*BIG, [-1]]]), "out of range"),
    (_with_chunks([["model/small", "", 3, [3]]]), "out of range"),  # beyond the file's size
    (_with_chunks([[*BIG, [profiles.MAX_CHUNKS]]]), "out of range"),
    (_with_chunks([[*BIG, [True]]]), "out of range"),
    (_with_chunks([[*BIG, [1, 1]]]), "twice"),
    (_with_chunks([[*BIG, []]]), "non-empty"),
    (_with_chunks([["../x", "", 10, [0]]]), "bad big file name"),
    (_with_chunks([[*BIG]]), "not \\[name"),
    (_with_chunks({"a": 1}), "at most"),
])
def test_hostile_chunk_lists_are_one_line_errors(data: bytes, words: str) -> None:
    with pytest.raises(LazyshimError, match=words) as e:
        profiles.parse(data)
    assert "\n" not in str(e.value)


def test_chunks_of_big_files_not_seen_this_run_are_kept() -> None:
    old = _profile()
    other = ("model/b.bin", "", 8 << 20)
    old.chunks = [(*BIG, [1, 2]), (*other, [3])]
    # the run served both and touched only BIG's chunk 7: that replaces the old lists
    assert profiles.merge_chunks([(*BIG, [7])], {BIG, other}, old, cut_short=False) == [(*BIG, [7])]
    # `other` was not served (complete, read natively): its chunks stay
    assert profiles.merge_chunks([(*BIG, [7])], {BIG}, old, cut_short=False) == [(*BIG, [7]), (*other, [3])]
    assert profiles.merge_chunks([(*BIG, [7])], {BIG, other}, old, cut_short=True) == [(*BIG, [7]), (*other, [3])]
    many = [(f"f{i}", "", 1 << 30, list(range(1000))) for i in range(100)]
    merged = profiles.merge_chunks(many, set(), None, cut_short=False)
    assert sum(len(ks) for *_, ks in merged) == profiles.MAX_CHUNKS


def test_the_learner_merges_the_chunks_the_fuse_layer_saw_touched(store: Store, tmp_path: Path) -> None:
    from shim.bigfs.touched import Recorder

    f = _Filler([_entry("usr/bin/python3")])
    root = _Root([f])
    logs: list[str] = []
    learner = Learner(store, root, IMG_A, "reg.example:5000", "lib/py", ["python3"], "/", logs.append)
    learner.big_record = tmp_path / "bigfs.touched"
    rec = Recorder(learner.big_record, [BIG], logs.append)
    root.look(f, 0)
    rec.touch(0, range(3, 5))
    rec.touch(0, range(4, 5))
    rec.touch(0, range(0, 1))
    learner.save()
    saved = profiles.find(store, IMG_A, "reg.example:5000", "lib/py", ["python3"], "/")
    assert saved.chunks == [(*BIG, [3, 4, 0])]
    rec.touch(0, range(9, 10))  # a touch after a save: written again, though no file was new
    learner.save()
    assert profiles.find(store, IMG_A, "reg.example:5000", "lib/py", ["python3"], "/").chunks == [(*BIG, [3, 4, 0, 9])]
    # A run without a FUSE layer (the big file is complete) keeps the chunks for the next cold store.
    f2 = _Filler([_entry("usr/bin/python3"), _entry("etc/passwd", D2, 3)])
    root2 = _Root([f2])
    nxt = Learner(store, root2, IMG_A, "reg.example:5000", "lib/py", ["python3"], "/", logs.append)
    root2.look(f2, 1)
    nxt.save()
    saved = profiles.find(store, IMG_A, "reg.example:5000", "lib/py", ["python3"], "/")
    assert [n for n, _, _ in saved.files] == ["etc/passwd"] and saved.chunks == [(*BIG, [3, 4, 0, 9])]
