"""Start-up timing marks: `LAZYSHIM_TRACE=FILE` appends one line per phase boundary.

    <CLOCK_MONOTONIC seconds> <pid> <who> <phase>

The runtime, the supervisor and the big-file server mark where their start-up phases end,
all on the one system-wide monotonic clock, so one file orders the processes' phases and
`python -m shim.trace FILE` turns it into milliseconds since the first mark.  Off (one
dict lookup at import, nothing per mark) unless the variable is set; for measuring, never
read by anything that decides.
"""

from __future__ import annotations

import os
import sys
import time

_path = os.environ.get("LAZYSHIM_TRACE") or None


def enabled() -> bool:
    return _path is not None


def mark(who: str, phase: str) -> None:
    """Append one mark (a failed write is ignored: tracing never fails a run)."""
    if _path is None:
        return
    line = f"{time.monotonic():.6f} {os.getpid()} {who} {phase}\n"
    try:
        fd = os.open(_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def report(lines: list[str]) -> str:
    """The marks as a table: ms since the first mark, ms since the previous one, who, phase."""
    rows = []
    for line in lines:
        parts = line.split(None, 3)
        if len(parts) == 4:
            try:
                rows.append((float(parts[0]), parts[2], parts[3].strip()))
            except ValueError:
                continue
    rows.sort()
    if not rows:
        return "no marks"
    t0, prev = rows[0][0], rows[0][0]
    out = []
    for t, who, phase in rows:
        out.append(f"{(t - t0) * 1000:8.1f} {(t - prev) * 1000:+8.1f}  {who:<10} {phase}")
        prev = t
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as f:
        print(report(f.read().splitlines()))
