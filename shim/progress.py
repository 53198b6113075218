"""Progress of long work, as podman shows it: on a terminal one line per layer updated in
place (a bar, bytes, files); elsewhere one line per layer when it is done; nothing when
quiet.  Written to stderr, so stdout keeps only the result (an image id, a digest)."""

from __future__ import annotations

import sys
from typing import TextIO

BAR = 24


def human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


class Progress:
    def __init__(self, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        try:
            self.tty = self.stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self._shown = ""

    def update(self, line: str) -> None:
        """Mid-layer state: shown only on a terminal, rewriting the current line."""
        if self.quiet or not self.tty or line == self._shown:
            return
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()
        self._shown = line

    def finish(self, line: str) -> None:
        """A layer is done: its last line stays (and is the only one without a terminal)."""
        if self.quiet:
            return
        self.stream.write(("\r\x1b[K" if self.tty else "") + line + "\n")
        self.stream.flush()
        self._shown = ""

    def message(self, text: str) -> None:
        if not self.quiet:
            self.stream.write(text + "\n")
            self.stream.flush()


def files_bar(label: str, files: int, of_files: int, fetched: int) -> str:
    """A bar by files done, with the bytes fetched so far (a fill knows no byte total ahead)."""
    frac = min(1.0, files / of_files) if of_files > 0 else 1.0
    filled = "=" * int(frac * BAR)
    shown = (filled + (">" if len(filled) < BAR else "")).ljust(BAR)
    return f"{label}  [{shown}]  {files}/{of_files} files  {human(fetched)} fetched"


def pull_reporter(progress: Progress):
    """A `pull(progress=...)` callback: a lazy layer costs its TOC, a legacy one its blob."""
    def report(index: int, count: int, desc, meta) -> None:
        label = f"layer {index + 1}/{count} {desc.digest[:19]}"
        if meta is None:
            progress.update(f"{label}  {human(desc.size)}  reading its table of contents ...")
            return
        files = meta.table.regular_files()
        how = "streamed in full" if meta.format == "legacy" else "lazy: table of contents only"
        progress.finish(f"{label}  {meta.format}, {files} files, {human(desc.size)}  ({how})")
    return report
