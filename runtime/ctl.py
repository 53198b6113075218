"""Verbs on standalone containers, as podman has them: ps, logs, stop, rm, exec.

A container is named by its id (its `--name` when given) or a unique prefix of it.  Its
state is read from its record and its owner (`runtime.containers`): running while a live
process holds its lock, exited once the exit code is recorded.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from shim import api
from shim.errors import LazyshimError
from shim.output import emit

from . import containers

STOP_POLL = 0.05


def resolve(store, ref: str) -> tuple[Path, containers.Record]:
    dirs = containers.list_dirs(store.containers)
    exact = [d for d in dirs if d.name == ref]
    hits = exact or [d for d in dirs if d.name.startswith(ref)]
    if not hits:
        raise LazyshimError(f"no container with name or ID {ref!r} found")
    if len(hits) > 1:
        raise LazyshimError(f"{ref!r} names more than one container: {', '.join(d.name for d in hits[:5])}")
    rec = containers.load(hits[0])
    if rec is None:
        raise LazyshimError(f"container {hits[0].name!r} has no readable record")
    return hits[0], rec


def status(cdir: Path) -> tuple[str, int | None]:
    if containers.is_owned(cdir):
        return "running", None
    code = containers.exit_code(cdir)
    return ("exited", code) if code is not None else ("unknown", None)


def _ago(t: float) -> str:
    s = max(0, int(time.time() - t))
    for unit, n in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if s >= n:
            return f"{s // n} {unit} ago"
    return f"{s} seconds ago"


def cmd_ps(args) -> int:
    store = api.open_store()
    rows = []
    for cdir in containers.list_dirs(store.containers):
        rec = containers.load(cdir)
        if rec is None:
            continue
        state, code = status(cdir)
        if state != "running" and not args.all:
            continue
        rows.append({"Id": rec.id, "Names": [rec.name or rec.id], "Image": rec.image, "ImageID": rec.image_id,
                     "Command": rec.command, "Created": int(rec.created), "State": state, "ExitCode": code,
                     "AutoRemove": rec.rm})
    if args.quiet:
        for r in rows:
            print(r["Id"])
        return 0
    if args.format != "json":  # the table's and templates' derived fields, as podman names them
        for r in rows:
            r.update(ID=r["Id"][:12], Names=r["Names"][0], Command=" ".join(r["Command"])[:30],
                     CreatedAgo=_ago(r["Created"]), Status="Up" if r["State"] == "running" else (
                         f"Exited ({r['ExitCode']})" if r["ExitCode"] is not None else r["State"]))
    emit(rows, args.format, [("CONTAINER ID", "ID"), ("IMAGE", "Image"), ("COMMAND", "Command"),
                             ("CREATED", "CreatedAgo"), ("STATUS", "Status"), ("NAMES", "Names")])
    return 0


def cmd_logs(args) -> int:
    store = api.open_store()
    cdir, rec = resolve(store, args.container)
    if not rec.log:
        raise LazyshimError(f"container {rec.id!r} ran in the foreground: its output went to its terminal")
    try:
        f = open(rec.log, "rb")  # noqa: SIM115 - read while the container writes
    except OSError as e:
        raise LazyshimError(f"container {rec.id!r}: no log ({e.strerror})") from e
    with f:
        running = True
        while True:
            chunk = f.read(65536)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                continue
            if not args.follow or not running:
                return 0
            running = containers.is_owned(cdir)  # one more read after it stopped: nothing is lost
            if running:
                time.sleep(STOP_POLL)  # following a file that grows: poll it, like tail -f


def stop(cdir: Path, rec: containers.Record, timeout: float) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; returns once the owner has let go."""
    if not containers.is_owned(cdir):
        return
    for sig, wait in (("TERM", timeout), ("KILL", 30.0)):
        if timeout <= 0 and sig == "TERM":
            continue
        containers.delegate(rec, "kill", rec.id, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not containers.is_owned(cdir):
                return
            time.sleep(STOP_POLL)  # the owner tears down and lets go: wait for it, bounded
    raise LazyshimError(f"container {rec.id!r} did not stop")


def cmd_stop(args) -> int:
    store = api.open_store()
    for ref in args.container:
        cdir, rec = resolve(store, ref)
        stop(cdir, rec, args.time)
        print(rec.name or rec.id)
    return 0


def cmd_rm(args) -> int:
    store = api.open_store()
    for ref in args.container:
        cdir, rec = resolve(store, ref)
        if containers.is_owned(cdir):
            if not args.force:
                raise LazyshimError(f"container {rec.id!r} is running: stop it first, or use rm -f")
            stop(cdir, rec, 0)
        if cdir.exists():
            fd = containers.try_own(cdir)
            if fd is None:
                if cdir.exists():
                    raise LazyshimError(f"container {rec.id!r} is busy")
            else:
                try:
                    containers.teardown(cdir, rec, None, remove=True)
                finally:
                    os.close(fd)
        print(rec.name or rec.id)
    return 0


def cmd_exec(args) -> int:
    """The delegate's exec, on the container's delegate root: the supervisor gets the new
    process's notify fd from the delegate, so its opens are filled too."""
    store = api.open_store()
    cdir, rec = resolve(store, args.container)
    if not containers.is_owned(cdir) or not containers.delegate_has(rec):
        raise LazyshimError(f"container {rec.id!r} is not running")
    if not args.command:
        raise LazyshimError("exec needs a command")
    argv = [rec.delegate, "--root", rec.delegate_root, "exec"]
    if args.tty:
        argv.append("--tty")
    for e in args.env:
        argv += ["--env", e]
    if args.user:
        argv += ["--user", args.user]
    if args.workdir:
        argv += ["--cwd", args.workdir]
    argv += [rec.id, *args.command]
    sys.stdout.flush()
    sys.stderr.flush()
    from .attach import state_dir
    from .traced_exec import run_traced, traced_socket

    sock = traced_socket(state_dir(rec.id))
    if sock is not None:  # the ptrace backend: the new process must be a tracee before it exists
        return run_traced(argv, sock)
    os.execv(argv[0], argv)
    return 127  # not reached


def add_parsers(sub) -> None:
    p = sub.add_parser("ps", help="list containers of `lazyshim run`")
    p.add_argument("-a", "--all", action="store_true", help="also stopped ones")
    p.add_argument("-q", "--quiet", action="store_true", help="ids only")
    p.add_argument("--format", help="json, or a template such as '{{.ID}} {{.Status}}'")
    p.set_defaults(func=cmd_ps)
    p = sub.add_parser("logs", help="show a detached container's output")
    p.add_argument("-f", "--follow", action="store_true")
    p.add_argument("container")
    p.set_defaults(func=cmd_logs)
    p = sub.add_parser("stop", help="stop containers (SIGTERM, then SIGKILL)")
    p.add_argument("-t", "--time", type=float, default=10.0, help="seconds before SIGKILL (default 10)")
    p.add_argument("container", nargs="+")
    p.set_defaults(func=cmd_stop)
    p = sub.add_parser("rm", help="remove stopped containers (-f: running ones too)")
    p.add_argument("-f", "--force", action="store_true")
    p.add_argument("container", nargs="+")
    p.set_defaults(func=cmd_rm)
    p = sub.add_parser("exec", help="run a command in a running container")
    p.add_argument("-i", "--interactive", action="store_true", help="(stdin is always passed)")
    p.add_argument("-t", "--tty", action="store_true")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    p.add_argument("-u", "--user", help="UID[:GID]")
    p.add_argument("-w", "--workdir")
    p.add_argument("container")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_exec)
