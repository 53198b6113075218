"""Start-up profiles in the supervisor: learn what the workload needs, prefetch what it needed.

Learning costs the answer path one dict lookup per trapped open of an image file: the lazy
root notes each file it is asked about in a dict (first need first, bounded), and the profile
is written when the runtime tells the supervisor to finish, or when it ends; never before an
answer.  What an earlier run of the image (or of another tag of its repository, with the same
command) needed is matched by path and content digest and fetched as a start-up set.  A
profile only decides what is fetched early: every byte is verified against the TOC as always.

Big files are the container's FUSE layer's: the chunks it saw touched (`shim.bigfs.touched`,
a file the runtime names in `big_record`) are merged into the profile here, so that one
process writes it; the FUSE server of the next cold start fetches them (`shim.bigfs.warm`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import LazyshimError
from ..lazyroot import LazyRoot
from ..store import profiles
from ..store.layout import Store
from ..store.metadata import load_image


class Learner:
    def __init__(self, store: Store, root: LazyRoot, image_id: str, registry: str, repository: str,
                 args: Sequence[str], cwd: str, log: Callable[[str], None]) -> None:
        self.store = store
        self.root = root
        self.image_id, self.registry, self.repository = image_id, registry, repository
        self.args, self.cwd = list(args), cwd
        self.log = log
        self.previous = profiles.find(store, image_id, registry, repository, self.args, cwd, log)
        self.needed: dict = {}
        root.recording = self.needed
        root.recording_cap = profiles.MAX_FILES
        self.partial = False  # this process does not see the whole run (a restarted supervisor)
        self.big_record: Path | None = None  # where the FUSE layer writes the chunks it saw touched
        self._lock = threading.Lock()
        self._written: tuple[int, int] = (0, 0)

    @classmethod
    def for_image(cls, store: Store, root: LazyRoot, image_id: str | None, layers: list[str], args: Sequence[str],
                  cwd: str, log: Callable[[str], None]) -> Learner | None:
        """A learner for the image the container runs (found by its layers when not named),
        or None (with a log line) when the image is not in the store."""
        image_id = image_id or profiles.image_of_layers(store, layers)
        if image_id is None:
            log("profile: no single image in the store is made of these layers; not learning")
            return None
        try:
            rec = load_image(store.image_file(image_id).read_bytes())
        except (OSError, LazyshimError) as e:
            log(f"profile: image {image_id[:19]}: {e}; not learning")
            return None
        return cls(store, root, rec.id, rec.registry, rec.repository, args, cwd, log)

    def plan(self) -> list[tuple[object, list[int]]]:
        """The earlier profile's files this image holds and has not filled yet, per layer
        (the layer of the first needed file first), in the order they were needed."""
        if self.previous is None:
            return []
        metas = self.root.metas[::-1]
        fillers = {id(f.meta): f for f in self.root.fillers}
        groups: dict[int, list[int]] = {}
        for layer, idx in profiles.match(self.previous.files, [m.toc.entries for m in metas]):
            filler = fillers.get(id(metas[layer]))
            if filler is not None and not filler.is_filled(idx):
                groups.setdefault(layer, []).append(idx)
        plan = [(fillers[id(metas[layer])], indices) for layer, indices in groups.items()]
        same = "this image" if self.previous.image == self.image_id else f"image {self.previous.image[:19]}"
        self.log(f"profile of {same}: {len(self.previous.files)} files, "
                 f"{sum(len(i) for _, i in plan)} to fetch now")
        return plan

    def save(self, cut_short: bool = False) -> None:
        """Write what this run needed (if it needed anything new since the last save), and the
        chunks of big files it touched.  `cut_short`: the run stopped seeing its needs (the
        image became complete), so the earlier profile's other files are kept after them."""
        from ..bigfs import touched

        with self._lock:
            needed = list(self.needed)  # one C-level copy: notify threads may add beside it
            big = touched.read(self.big_record) if self.big_record is not None else None
            served, chunks = big if big is not None else ([], [])
            state = (len(needed), sum(len(ks) for *_, ks in chunks))
            if (not needed and not chunks) or state == self._written:
                return
            files = []
            for filler, idx in needed:
                e = filler.meta.toc.entries[idx]
                files.append((e.name, e.digest or "", e.size))
            cut_short = cut_short or self.partial or len(needed) >= profiles.MAX_FILES
            p = profiles.Profile(self.image_id, self.registry, self.repository, self.args, self.cwd,
                                 profiles.keep_or_merge(files, self.previous, cut_short or not needed),
                                 chunks=profiles.merge_chunks(chunks, set(served), self.previous,
                                                              cut_short or state[1] >= profiles.MAX_CHUNKS))
            try:
                profiles.save(self.store, p)
            except (OSError, LazyshimError) as e:
                self.log(f"profile not saved: {e}")
                return
            self._written = state
            self.log(f"profile saved: {len(p.files)} files ({len(needed)} needed by this run), "
                     f"{sum(len(ks) for *_, ks in p.chunks)} chunks of {len(p.chunks)} big files "
                     f"({state[1]} touched by this run)")
