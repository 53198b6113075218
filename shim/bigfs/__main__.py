"""The per-container FUSE server of big files (started by the runtime before the overlay).

    python -m shim.bigfs --store ROOT --layers D1,D2 --mount DIR --threshold N
                         [--sources REF,...] [--ready-fd N] [--log FILE] [--record FILE]
                         [--background none|prioritized|all] [--demand FILE]
                         [--profile-command JSON [--profile-image ID]]

`--record`: each chunk's first touch is appended there (`shim.bigfs.touched`), for the
supervisor to learn into the image's profile.  Unless `--background none`, the chunks the
image's profile lists for this command are fetched at once; with `all` the rest follow, paced
(`shim.bigfs.warm`), yielding to the supervisor's misses too through the `--demand` board
(`shim.demand`); with `none` no chunk is fetched that no reader asked for.

Mounts DIR, writes b"1" on the ready fd once the kernel serves it, and runs until DIR is
unmounted or the process gets SIGTERM (libfuse then unmounts it).  Exits 1 (ready fd
closed without a byte) when there is nothing to serve or the mount fails.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lazyshim-bigfs")
    p.add_argument("--store", required=True)
    p.add_argument("--layers", required=True)
    p.add_argument("--sources", default="")
    p.add_argument("--mount", required=True)
    p.add_argument("--threshold", type=int, required=True)
    p.add_argument("--ready-fd", type=int, default=-1)
    p.add_argument("--log")
    p.add_argument("--record")
    p.add_argument("--background", choices=("none", "prioritized", "all"), default="none")
    p.add_argument("--demand", help="the container's demand board, shared with its supervisor (`shim.demand`)")
    p.add_argument("--profile-command")
    p.add_argument("--profile-image")
    a = p.parse_args(argv)
    a.started = time.monotonic()
    log_file = open(a.log, "a", buffering=1) if a.log else sys.stderr  # noqa: SIM115 - the process's log

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} bigfs: {msg}", file=log_file)

    from ..errors import LazyshimError

    try:
        ops = _operations(a, log)
    except (LazyshimError, OSError) as e:
        log(str(e))
        return 1
    if ops is None:
        log("no big file to serve")
        return 1
    import mfusepy as fuse

    try:
        fuse.FUSE(ops, a.mount, foreground=True, ro=True, allow_other=True, kernel_cache=True,
                  fsname="lazyshim-bigfs", subtype="lazyshim")
    except RuntimeError as e:  # libfuse's own status: a failed mount, or a stop by signal
        if a.ready_fd >= 0:
            log(f"mounting {a.mount} failed (libfuse status {e})")
            return 1
    log("stopped")
    return 0


def _operations(a: argparse.Namespace, log):
    from ..sources import fill_sources
    from ..store.layout import Store
    from ..store.partials import open_partial, publish
    from .chunked import BigFile
    from .fs import BigFS
    from .plan import served

    store = Store(Path(a.store))
    layers = [d for d in a.layers.split(",") if d]
    refs = [r for r in a.sources.split(",") if r]
    wanted = served(store, layers, a.threshold)
    if not wanted:
        return None
    sources: dict[str, object] = {}
    import threading

    guard = threading.Lock()

    def source_of(meta):
        def get():
            with guard:
                src = sources.get(meta.digest)
                if src is None:
                    src = sources[meta.digest] = fill_sources(store, refs, layers).source(
                        meta.digest, meta.registry, meta.repository)
                return src
        return get

    names: dict[int, str] = {}

    def complete(f: BigFile) -> None:
        """In the read that verified the last chunk: the next container reads it natively."""
        if not f.whole_digest_ok():
            log(f"{f.entry.name!r}: every chunk verified but not the whole file's digest: not made an object")
            return
        try:
            publish(store, names[id(f)])
            log(f"{f.entry.name!r} is complete: new containers read it natively")
        except OSError as e:
            log(f"publishing {f.entry.name!r}: {e}")

    files: dict[str, BigFile] = {}
    for s in wanted:
        e = s.meta.toc.entries[s.idx]
        f = BigFile(e, s.meta.format, source_of(s.meta), open_partial(store, s.name, e.size), complete, log)
        names[id(f)] = s.name
        files[s.name] = f

    def ready() -> None:
        if a.ready_fd >= 0:
            os.write(a.ready_fd, b"1")
            os.close(a.ready_fd)
            a.ready_fd = -1
        log(f"serving {len(files)} big files on {a.mount} ({_since(a.started)} after start)")

    from . import warm
    from .touched import Recorder

    served_files = list(files.values())  # the FUSE file handles' order, and the record's
    recorder = None
    if a.record:
        keys = [(f.entry.name, f.entry.digest or "", f.entry.size) for f in served_files]
        recorder = Recorder(Path(a.record), keys, log)
    from ..demand import BIG_FILES, open_board

    readers = warm.Readers(open_board(a.demand, BIG_FILES, log))
    if a.background != "none":
        plan = _profile_plan(a, store, layers, served_files, log)
        warm.start(served_files, plan, a.background == "all", readers, log)  # at once, beside the mount
    return BigFS(files, log, on_init=ready, recorder=recorder, readers=readers)


def _profile_plan(a: argparse.Namespace, store, layers: list[str], files, log) -> list:
    """The chunks the image's start-up profile for this command lists (none without one)."""
    import json

    from ..errors import LazyshimError
    from ..store import profiles
    from ..store.metadata import load_image
    from .warm import profile_plan

    if not a.profile_command:
        return []
    try:
        cmd = json.loads(a.profile_command)
        args, cwd = cmd["args"], cmd["cwd"]
        image_id = a.profile_image or profiles.image_of_layers(store, layers)
        if image_id is None:
            return []
        rec = load_image(store.image_file(image_id).read_bytes())
    except (ValueError, KeyError, TypeError, OSError, LazyshimError) as e:
        log(f"profile: {str(e)[:200]}; no chunk prefetched")
        return []
    p = profiles.find(store, rec.id, rec.registry, rec.repository, args, cwd, log)
    if p is None or not p.chunks:
        return []
    plan = profile_plan(files, p.chunks, log)
    log(f"profile: {sum(len(ks) for *_, ks in p.chunks)} chunks of {len(p.chunks)} big files, {len(plan)} to fetch now")
    return plan


def _since(t: float) -> str:
    return f"{time.monotonic() - t:.2f} s"


if __name__ == "__main__":
    sys.exit(main())
