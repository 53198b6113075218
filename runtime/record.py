"""`lazyshim record IMAGE [CMD...]`: which files a workload needs, in the order it needs them.

Runs the workload once from an empty store with nothing fetched in the background, and
writes the files the supervisor had to fill, first need first.  That list is what
`lazyshim convert --prioritize LIST` puts before each layer's `.prefetch.landmark`, so the
optimized image's start-up set arrives in a few large range requests instead of one round
trip per file.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from shim.errors import LazyshimError


def cmd_record(args) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="lazyshim-record-"))
    log = scratch / "filled.txt"
    try:
        env = dict(os.environ, LAZYSHIM_ROOT=str(scratch / "store"))
        argv = [sys.executable, "-m", "runtime.main", "run", "--rm", "--no-background-fetch", "--record", str(log),
                args.image, *args.command]
        rc = subprocess.call(argv, env=env, stdin=subprocess.DEVNULL,
                             stdout=sys.stderr)  # the workload's output is not the list
        if rc != 0:
            raise LazyshimError(f"the workload exited with {rc}; nothing recorded")
        seen: dict[str, None] = {}
        for line in log.read_text().splitlines() if log.exists() else []:
            seen.setdefault(line, None)
        text = "".join(f"{p}\n" for p in seen)
        if args.output:
            Path(args.output).write_text(text)
        else:
            sys.stdout.write(text)
        print(f"recorded {len(seen)} files", file=sys.stderr)
        return 0
    finally:
        from shim import api

        api.release_store(scratch / "store")
        shutil.rmtree(scratch, ignore_errors=True)


def add_parser(sub) -> None:
    import argparse

    p = sub.add_parser("record", help="list the files a workload opens, for convert --prioritize")
    p.add_argument("-o", "--output", help="write the list here (default: stdout)")
    p.add_argument("image")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_record)
