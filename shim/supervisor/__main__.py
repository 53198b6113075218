"""Entry point of the per-container supervisor process (started by the runtime).

    python -m shim.supervisor --store ROOT --layers D1,D2 --listen-fd N --state-dir DIR [--sources REF,...]
                              [--trap notify|ptrace]

The runtime binds and listens on the `listenerPath` socket itself and hands us the fd, so
the socket is ready before `runc create` connects to it, without any waiting.  This process
becomes the keeper (keeper.py) and forks the supervisor proper, again whenever it dies.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from ..trace import mark

    mark("supervisor", "main")
    p = argparse.ArgumentParser(prog="lazyshim-supervisor")
    p.add_argument("--store", required=True)
    p.add_argument("--layers", required=True, help="comma-separated layer digests, bottom first")
    p.add_argument("--sources", default="",
                   help="comma-separated references of the image the container runs: where fills go first")
    p.add_argument("--listen-fd", type=int, required=True)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--ready-fd", type=int, default=-1, help="written once loaded and prefilled")
    p.add_argument("--go-fd", type=int, default=-1,
                   help="read before the rootfs is looked at: b'1' once it is mounted, EOF if the runtime gave up")
    p.add_argument("--rootfs", help="the container's rootfs as the host sees it (for prefill)")
    p.add_argument("--prefill", default="", help="colon-separated paths to fill before start")
    p.add_argument("--prefill-exec-candidates", default="",
                   help="colon-separated entrypoint paths; the first that exists is filled, interpreters too")
    p.add_argument("--record", help="append the path of every file filled on demand to this file")
    p.add_argument("--background", choices=("none", "prioritized", "all"), default="all",
                   help="what to fetch without being asked, after start")
    p.add_argument("--big-threshold", type=int, default=0,
                   help="files this big with verifiable chunks are served by the container's FUSE layer")
    p.add_argument("--profile-command", help='JSON {"args": [...], "cwd": "..."}: learn and use start-up profiles '
                   "of the image for this command")
    p.add_argument("--demand", help="the container's demand board, shared with its FUSE layer of big files "
                   "(`shim.demand`): each process's background yields to the other's on-demand fetches")
    p.add_argument("--big-record", help="where the container's FUSE layer records the chunks it saw touched "
                   "(merged into the learned profile)")
    p.add_argument("--profile-image", help="the image's id (manifest digest); default: the image made of --layers")
    p.add_argument("--no-keeper", action="store_true", help="serve in this process, without a keeper")
    p.add_argument("--trap", choices=("notify", "ptrace"), default="notify",
                   help="how trapped syscalls arrive: notify fds over the socket, or as the container's tracer")
    a = p.parse_args(argv)
    if a.no_keeper or a.trap == "ptrace":
        # A tracer cannot hand its tracees to a successor (they die with it: EXITKILL), so
        # under ptrace there is nothing for a keeper to keep.
        return _serve(a, None)
    from .keeper import keep

    # The keeper stays small: nothing beyond the standard library is imported before the fork.
    return keep(lambda handover: _serve(a, handover),
                close_after_start=tuple(fd for fd in (a.ready_fd, a.go_fd) if fd >= 0))


def _serve(a: argparse.Namespace, handover) -> int:
    from ..trace import mark

    mark("supervisor", "forked")
    from .heap import bound_heap

    bound_heap()  # before any thread: the fills' buffers must not stay resident
    from seccomp.verdict import Verdicts

    from ..errors import LazyshimError
    from ..lazyroot import LazyRoot
    from ..store.layout import Store
    from ..trace import mark
    from .server import Supervisor

    mark("supervisor", "imports")
    state = Path(a.state_dir)
    log = open(state / "supervisor.log", "a", buffering=1)
    resumed = handover is not None and handover.restarts > 0
    try:
        root = LazyRoot(Store(Path(a.store)), [d for d in a.layers.split(",") if d],
                        [r for r in a.sources.split(",") if r], big_threshold=a.big_threshold)
        vpath = state / "verdicts.json"
        mark("supervisor", "LazyRoot")
        verdicts = Verdicts.from_json(vpath.read_text()) if vpath.exists() else Verdicts.allow_all()
    except (LazyshimError, OSError, ValueError) as e:
        print(f"supervisor: {e}", file=log)
        return 1
    mark("supervisor", "verdicts")
    sup = Supervisor(root, verdicts, stats_path=state / "stats.json", log=log, handover=handover)
    if a.demand:
        from ..demand import SUPERVISOR, open_board

        sup.fills.demand = open_board(a.demand, SUPERVISOR, sup.fills.log)
    mark("supervisor", "Supervisor")
    if a.profile_command:
        sup.learner = _learner(a, root, sup.fills.log)
        if sup.learner is not None:
            sup.learner.partial = resumed  # what the dead predecessor saw is lost: keep the old profile's rest
            sup.learner.big_record = Path(a.big_record) if a.big_record else None
        if sup.learner is not None and not a.record and a.background != "none" and not resumed:
            sup.fills.prefetch_startup(sup.learner.plan())  # before and beside the prefill
        mark("supervisor", "learner")
    if a.record:
        sup.record = open(a.record, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
        for filler in root.fillers:  # every file the workload opens must be a miss, to be recorded
            filler.readahead = False
    background_started = False
    if resumed:
        sup.resume()  # the container runs already: no prefill, nobody waits for readiness
    else:
        if a.go_fd >= 0 and not _wait_for_go(a.go_fd):
            print("supervisor: the runtime gave up before the container's rootfs was mounted", file=log)
            return 1
        mark("supervisor", "go")
        if a.background != "none" and not a.record:
            # The start-up set (landmarks) goes out now, beside the prefill, before runc starts.
            sup.start_background(everything=a.background == "all")
            background_started = True
        if a.rootfs:
            try:
                # Readiness waits for what runc reads before the filter (/etc/passwd, /etc/group);
                # the entrypoint's chain goes on filling while runc starts (its exec waits for it).
                # A recording waits for all: what the workload opens itself must be a miss.
                sup.prefill(Path(a.rootfs), _split(a.prefill), _split(a.prefill_exec_candidates),
                            wait_for_exec=bool(a.record))
            except (LazyshimError, OSError) as e:
                print(f"supervisor: prefill: {e}", file=log)
                sup.fills.flush()  # what prefill did fill stays marked
                return 1
        mark("supervisor", "prefill")
        if a.ready_fd >= 0:
            os.write(a.ready_fd, b"1")
            os.close(a.ready_fd)
        if handover is not None:
            handover.ready()
    from .control import NAME

    sup.serve_control(state / NAME)
    if a.background != "none" and not background_started:
        sup.start_background(everything=a.background == "all")
    listener = socket.socket(fileno=os.dup(a.listen_fd))  # the keeper keeps the original for a successor
    if a.trap == "ptrace":
        from .ptrace_server import serve_traced

        serve_traced(sup, listener)
    else:
        sup.serve(listener)
    return 0


def _learner(a: argparse.Namespace, root, log):
    """The profile learner for this container's image and command, or None (with a log line)."""
    import json

    from ..store.layout import Store
    from .learning import Learner

    try:
        cmd = json.loads(a.profile_command)
        args, cwd = cmd["args"], cmd["cwd"]
        if not (isinstance(args, list) and all(isinstance(x, str) for x in args) and isinstance(cwd, str)):
            raise ValueError("args must be strings, cwd a string")
    except (ValueError, KeyError, TypeError) as e:
        log(f"profile: bad --profile-command: {e}")
        return None
    return Learner.for_image(Store(Path(a.store)), root, a.profile_image,
                             [d for d in a.layers.split(",") if d], args, cwd, log)


def _wait_for_go(fd: int) -> bool:
    """Wait until the runtime has mounted the rootfs (b"1"); False if it gave up (EOF)."""
    try:
        while True:
            try:
                return os.read(fd, 1) == b"1"
            except InterruptedError:
                continue
    except OSError:
        return False
    finally:
        os.close(fd)


def _split(s: str) -> list[str]:
    return [x for x in s.split(":") if x]


if __name__ == "__main__":
    sys.exit(main())
