"""A layer dir's fill marks: its byte map (one byte a TOC entry, 1 = filled and durable) and
the mark that every file is.

Kept apart from the filler so that a reader that only asks "is this layer complete?" (every
`lazyshim run`, before it decides whether a supervisor is needed at all) imports nothing
of the fill machinery.
"""

from __future__ import annotations

from pathlib import Path


def filled_map_path(layer_dir: Path) -> Path:
    return layer_dir / "filled"


COMPLETE_MARK = "complete"


def create_filled_map(layer_dir: Path, entries: int, all_filled: bool = False) -> None:
    with open(filled_map_path(layer_dir), "wb") as f:
        f.write((b"\1" if all_filled else b"\0") * max(entries, 1))
    if all_filled:
        mark_complete(layer_dir)


def mark_complete(layer_dir: Path) -> None:
    """Record that every file of the layer is on disk (after the data was made durable), so
    a runtime can start containers of it without any supervisor: native speed."""
    (layer_dir / COMPLETE_MARK).touch()


def is_complete(layer_dir: Path) -> bool:
    return (layer_dir / COMPLETE_MARK).exists()
