"""The one range merger: byte ranges of a blob into as few requests as make sense.

Fills (a file's chunks), readahead (a file and its neighbours), prefetch (a start-up set) and
the registry client's `get_ranges` all ask the same question: which half-open ranges should
share a request?  Pure: no I/O, no imports beyond the standard library (cf. stargz-snapshotter's
fs/remote regionSet).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field


@dataclass
class Span:
    """One request: [start, end) of the blob, and the keys of the ranges it serves."""

    start: int
    end: int
    keys: list[Hashable] = field(default_factory=list)


def merge(ranges: Iterable[tuple[int, int, Hashable]], gap: int = 0, max_span: int | None = None) -> list[Span]:
    """Merge half-open (start, end, key) ranges whose distance is <= `gap` into spans.

    Overlapping ranges always merge (one byte is never requested twice).  `max_span` caps a
    merged span; a single range longer than it stays whole, so merging never turns many
    small reads into one huge download, and never splits one read.  Empty ranges are dropped.
    """
    spans: list[Span] = []
    for start, end, key in sorted((r for r in ranges if r[1] > r[0]), key=lambda r: (r[0], r[1])):
        if spans:
            last = spans[-1]
            if start <= last.end + gap and (max_span is None or max(end, last.end) - last.start <= max_span
                                            or start < last.end):
                last.end = max(last.end, end)
                last.keys.append(key)
                continue
        spans.append(Span(start, end, [key]))
    return spans
