"""Which chunks of its big files a container touched: the FUSE server writes it, the supervisor
learns it into the image's start-up profile (`shim.store.profiles`, `chunks`).

The FUSE server and the supervisor are two processes, and the supervisor writes the profile
when the runtime tells it to finish, after the container is gone but before the FUSE layer is
stopped.  So the server appends each first touch to a file at once, before it answers the
read (one small O_APPEND write per chunk, never per read), and the supervisor reads that file
when it saves the profile: everything the workload touched is there by then.

    s <json [name, digest, size]>    a big file this server serves (the i-th `s` line is file i)
    t <i> <k>                        chunk k of file i, first touched now

The file lives in the container's directory (the runtime names it, `runtime.bigmount`), and
is read as hostile input: at most MAX_BYTES, bounded counts, malformed lines end the read.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

from ..store.profiles import MAX_CHUNK_FILES, MAX_CHUNKS

#: The reader takes at most this much of the file (every bound's worth of lines fits).
MAX_BYTES = MAX_CHUNK_FILES * 4300 + MAX_CHUNKS * 16

Key = tuple[str, str, int]  # (TOC name, digest or "", size)


class Recorder:
    """The FUSE server's side: served files declared once, each chunk's first touch appended."""

    def __init__(self, path: Path, files: list[Key], log: Callable[[str], None]) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._log = log
        self._lock = threading.Lock()
        self._count = 0
        self.files = files[:MAX_CHUNK_FILES]
        self._seen = [set() for _ in self.files]
        lines = "".join(f"s {json.dumps(list(k))}\n" for k in self.files)
        self._write(lines.encode())

    def touch(self, i: int, chunks: range) -> None:
        """A reader reads chunks `chunks` of file i (an index of `files`; others are not recorded)."""
        if i >= len(self._seen):
            return
        seen = self._seen[i]
        if all(k in seen for k in chunks):  # the common case, no lock: a set only grows
            return
        with self._lock:
            new = [k for k in chunks if k not in seen][:MAX_CHUNKS - self._count]
            if not new:
                return
            seen.update(new)
            self._count += len(new)
            self._write("".join(f"t {i} {k}\n" for k in new).encode())

    def _write(self, data: bytes) -> None:
        try:
            os.write(self._fd, data)
        except OSError as e:  # a full disk costs the profile's chunks, never a read
            self._log(f"recording touched chunks: {e}")


def read(path: Path) -> tuple[list[Key], list[tuple[str, str, int, list[int]]]] | None:
    """(the files the server served, their touched chunks as profile entries, first touch
    first), or None when there is no such file (no FUSE layer in this container)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES)
    except OSError:
        return None
    files: list[Key] = []
    touched: dict[int, list[int]] = {}
    seen: set[tuple[int, int]] = set()
    count = 0
    for line in data.split(b"\n")[:-1]:  # a last line without its newline was being written
        kind, _, rest = line.partition(b" ")
        if kind == b"s" and len(files) < MAX_CHUNK_FILES:
            key = _key(rest)
            if key is None:
                break
            files.append(key)
        elif kind == b"t" and count < MAX_CHUNKS:
            i, _, k = rest.partition(b" ")
            if not (i.isdigit() and k.isdigit() and len(i) < 8 and len(k) < 8):
                break
            fi, ki = int(i), int(k)
            if fi >= len(files) or ki >= min(files[fi][2], MAX_CHUNKS) or (fi, ki) in seen:
                break
            seen.add((fi, ki))
            touched.setdefault(fi, []).append(ki)
            count += 1
        else:
            break
    return files, [(*files[i], ks) for i, ks in touched.items()]


def _key(raw: bytes) -> Key | None:
    try:
        v = json.loads(raw)
    except ValueError:
        return None
    if not (isinstance(v, list) and len(v) == 3 and isinstance(v[0], str) and isinstance(v[1], str)
            and isinstance(v[2], int) and not isinstance(v[2], bool) and v[2] > 0):
        return None
    return v[0], v[1], v[2]
