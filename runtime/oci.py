"""The runc command-line contract: podman (`--runtime`), containerd (`BinaryName`) and
people call `lazyshim` exactly as they would call runc.

The wrapper is invisible.  It parses only what it needs (the verb, the container id,
`--bundle`, `--root`, `--log`/`--log-format`) the way Go's flag package does (flags up to
the first positional, `-x`/`--x`/`--x=v`, the last one wins), and for everything else
`execv`s the delegate (runc or crun) with the ORIGINAL argv: flags after the id, relative
paths, the cwd, stdin, the tty and inherited fds (`--preserve-fds`, `exec -p /dev/fd/63`,
`update -r -`) all pass through, and exit codes are the delegate's.

Only five verbs do anything of their own, and only for lazy bundles:
- `create`/`run` on a lazy bundle (see `runtime.lazybundle`): start the supervisor, write
  a patched config.json into a private bundle, run the delegate with `--bundle PRIVATE`;
  if the delegate fails, stop the supervisor again.
- `state`/`list`: report the caller's bundle, not the private one.
- `exec` into a lazy container under the ptrace backend: the delegate runs as a tracee of
  the container's supervisor (runtime.traced_exec); every other exec is a plain `execv`.
- `delete`: after the delegate deleted the container, stop the supervisor, unmount what we
  mounted, remove our state.
Everything else (start, kill, ps, pause, resume, update, events, features, spec,
checkpoint, restore) is a plain `execv`.

This module is imported on every call (podman runs `state` several times per container):
it imports nothing beyond `os` and `sys` until a lazy bundle is in play.
"""

from __future__ import annotations

import os
import sys

VERSION = "0.1.0"

GLOBAL_VALUE = frozenset({"log", "log-format", "root", "criu", "rootless"})
GLOBAL_BOOL = frozenset({"debug", "systemd-cgroup", "help", "h", "version", "v"})
CREATE_VALUE = frozenset({"bundle", "b", "console-socket", "pid-file", "preserve-fds", "pidfd-socket"})
CREATE_BOOL = frozenset({"no-pivot", "no-new-keyring"})
RUN_BOOL = CREATE_BOOL | {"detach", "d", "keep", "no-subreaper"}
SHARED_RUN = frozenset({"d", "detach"})
# Verbs both runc and the standalone runner have; `wants_oci` tells them apart by their arguments.
SHARED_VERBS = frozenset({"ps", "exec"})
# `lazyshim run IMAGE` (the standalone image runner, runtime.run) flags that runc's run lacks.
STANDALONE_RUN = frozenset({"rm", "i", "interactive", "t", "tty", "name", "e", "env", "u", "user",
                            "w", "workdir", "entrypoint", "network", "no-pull", "pull", "v", "volume",
                            "mount", "env-file", "read-only", "hostname", "m", "memory", "cpus"})
IMAGE_VERBS = frozenset({"pull", "images", "inspect", "rmi", "fetch", "convert", "stats", "mount", "umount", "record",
                         "gc", "logs", "stop", "rm", "info", "df", "completion", "snapshotter",
                         "layer-store", "profile"})
TRUE = frozenset({"1", "t", "T", "true", "TRUE", "True"})


class Usage(Exception):
    """The command line does not parse the way Go's flag package would take it."""


def parse_flags(args: list[str], value_flags: frozenset[str]) -> tuple[list[tuple[str, str, int, int]], int]:
    """Go flag parsing: ([(name, value, first token, end token)], index of the first positional)."""
    items: list[tuple[str, str, int, int]] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            return items, i + 1
        if len(a) < 2 or a[0] != "-":
            break
        name = a[2:] if a.startswith("--") else a[1:]
        if not name or name[0] in "-=":
            raise Usage(f"bad flag syntax: {a}")
        name, eq, value = name.partition("=")
        start = i
        if not eq:
            if name in value_flags:
                i += 1
                if i >= len(args):
                    raise Usage(f"flag needs an argument: -{name}")
                value = args[i]
            else:
                value = "true"
        i += 1
        items.append((name, value, start, i))
    return items, i


def _last(items, *names: str) -> str | None:
    value = None
    for name, v, _, _ in items:
        if name in names:
            value = v
    return value


# ---- dispatch between the runc contract and lazyshim's own image verbs -------------------
def wants_oci(argv: list[str]) -> bool:
    """True when argv is a runc command line, False for lazyshim's own verbs and help.

    `run` is the one clash: runc's `run [flags] ID` vs. the standalone `run IMAGE [CMD...]`.
    It is runc's when a global flag precedes it, when it carries a flag only runc's run has
    (--bundle/-b, --detach/-d, --pid-file, --console-socket, ...), or when its one argument is
    a valid container id and ./config.json exists (runc's bundle defaults to the cwd).  It is
    the standalone runner when it carries a standalone-only flag (--rm, -i, -t, -e, --name,
    ...), when its first argument cannot be a container id (image refs with `/`, `:` or `@`),
    when a command follows the image, or when there is no ./config.json.
    """
    try:
        g, vi = parse_flags(argv, GLOBAL_VALUE)
    except Usage:
        return True
    verb = argv[vi] if vi < len(argv) else None
    names = {n for n, _, _, _ in g}
    if verb is None:
        return bool(names - {"help", "h"})
    if verb in IMAGE_VERBS or verb == "help":
        return False
    if verb == "run":
        return bool(g) or is_runc_run(argv[vi + 1:])
    if verb == "ps" and not g:
        return _has_positional(argv[vi + 1:], frozenset({"format", "f"}))  # runc's `ps ID`
    if verb == "exec" and not g:
        return not _standalone_container(argv[vi + 1:])
    return True


def _has_positional(rest: list[str], value_flags: frozenset[str]) -> bool:
    try:
        _, pi = parse_flags(rest, value_flags)
    except Usage:
        return False
    return pi < len(rest)


EXEC_VALUE = frozenset({"console-socket", "pid-file", "process", "p", "env", "e", "cwd", "user", "u",
                        "additional-gids", "g", "cap", "c", "apparmor", "process-label", "preserve-fds",
                        "cgroup", "w", "workdir"})


def _standalone_container(rest: list[str]) -> bool:
    """`exec ID ...` where ID names a `lazyshim run` container of the store (runtime.ctl resolves it)."""
    try:
        _, pi = parse_flags(rest, EXEC_VALUE)
    except Usage:
        return False
    if pi >= len(rest):
        return False
    from .paths import valid_id

    if not valid_id(rest[pi]):
        return False
    from shim.store.layout import default_root

    try:
        names = os.listdir(os.path.join(default_root(), "containers"))
    except Exception:  # noqa: BLE001 - no store (or a broken config): runc's exec reports the id
        return False
    return any(n.startswith(rest[pi]) for n in names if n != "oci")  # an id, a name or a prefix


def is_runc_run(rest: list[str]) -> bool:
    from .paths import valid_id

    i = 0
    while i < len(rest):
        a = rest[i]
        if a == "--":
            i += 1
            break
        if len(a) < 2 or a[0] != "-":
            break
        name = (a[2:] if a.startswith("--") else a[1:]).partition("=")[0]
        if name in SHARED_RUN:  # `-d` is both runc's and podman's: the arguments decide
            i += 1
            continue
        if name in CREATE_VALUE or name in RUN_BOOL:
            if name in CREATE_VALUE and "=" not in a:
                i += 1
            i += 1
            return True
        return False  # a standalone flag, or one neither knows (argparse explains better)
    positional = rest[i:]
    if len(positional) != 1 or not valid_id(positional[0]):
        return False
    return os.path.exists("config.json")


# ---- the runc verbs ---------------------------------------------------------------------
class Ctx:
    def __init__(self, argv: list[str], globals_: list[tuple[str, str, int, int]], vi: int) -> None:
        self.argv = argv
        self.globals = globals_
        self.vi = vi
        self.verb = argv[vi] if vi < len(argv) else None
        self.rest = argv[vi + 1:]
        self._delegate: str | None = None

    @property
    def delegate(self) -> str:
        if self._delegate is None:
            from .delegate import find_delegate

            self._delegate = find_delegate()
        return self._delegate

    @property
    def root(self) -> str:
        root = _last(self.globals, "root")
        if not root:
            from .delegate import default_root

            root = default_root(self.delegate)
        return os.path.abspath(root)

    def state_dir(self, container_id: str) -> str:
        from .paths import oci_state_dir

        return oci_state_dir(self.root, container_id)

    def delegate_argv(self, argv: list[str] | None = None) -> list[str]:
        return [self.delegate] + (self.argv if argv is None else argv)

    def exec_delegate(self) -> int:
        argv = self.delegate_argv()
        sys.stdout.flush()
        os.execv(argv[0], argv)
        return 127  # not reached

    def fail(self, msg: str) -> int:
        """An error of our own before the delegate ran: runc's form, one line, exit 1."""
        log = _last(self.globals, "log")
        if log:
            try:
                _write_log(log, _last(self.globals, "log-format") or "text", msg)
            except OSError:
                pass
        try:
            sys.stderr.write(f"lazyshim: {msg}\n")
            sys.stderr.flush()
        except OSError:
            pass
        return 1


def _write_log(path: str, fmt: str, msg: str) -> None:
    import json
    import time

    t = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if fmt == "json":
        line = json.dumps({"level": "error", "msg": msg, "time": t})
    else:
        line = f'time="{t}" level=error msg={json.dumps(msg)}'
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    try:
        g, vi = parse_flags(argv, GLOBAL_VALUE)
    except Usage:
        g, vi = [], len(argv)  # the delegate explains its own usage errors
    ctx = Ctx(argv, g, vi)
    try:
        if {n for n, v, _, _ in g if v in TRUE} & {"version", "v"}:
            return _version(ctx)
        handler = HANDLERS.get(ctx.verb or "")
        if handler is not None:
            rc = handler(ctx)
            if rc is not None:
                return rc
        return ctx.exec_delegate()
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the contract is one line and exit 1, never a traceback
        return ctx.fail(_describe(e))


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    from shim.errors import LazyshimError

    if isinstance(e, (LazyshimError, ValueError)):
        return str(e)
    return f"{type(e).__name__}: {e}"


def _version(ctx: Ctx) -> int:
    """The delegate's version lines (first line stays `runc version X`), then ours."""
    rc = spawn(ctx.delegate_argv())
    if rc == 0:
        sys.stdout.write(f"lazyshim: {VERSION}\n")
    return rc


def _create(ctx: Ctx) -> int | None:
    """create / run: lazy bundles get a supervisor and a private bundle; others pass through."""
    value_flags = CREATE_VALUE
    bool_flags = RUN_BOOL if ctx.verb == "run" else CREATE_BOOL
    try:
        items, pi = parse_flags(ctx.rest, value_flags)
    except Usage:
        return None
    if any(n not in value_flags and n not in bool_flags for n, _, _, _ in items):
        return None  # a flag we do not know: the delegate decides what it means
    from .paths import valid_id

    ids = ctx.rest[pi:]
    if len(ids) != 1 or not valid_id(ids[0]):
        return None
    cid = ids[0]
    bundle = _last(items, "bundle", "b") or "."

    from . import lazybundle

    found = lazybundle.detect(bundle)
    if found is None:
        return None
    root = ctx.root
    if os.path.lexists(os.path.join(root, cid)):
        return None  # the delegate says "container with given ID already exists"
    sdir = ctx.state_dir(cid)
    private = lazybundle.prepare(found, cid, sdir)
    try:
        argv = _rewrite_create_argv(ctx, items, pi, private, found.bundle)
        if ctx.verb == "create":
            rc = spawn(ctx.delegate_argv(argv))
            if rc != 0:
                lazybundle.cleanup(sdir)
            return rc
        rc = spawn_forwarding(ctx.delegate_argv(argv))
        detached = _last(items, "detach", "d") in TRUE
        kept = _last(items, "keep") in TRUE
        if rc != 0 or not (detached or kept):
            if not os.path.lexists(os.path.join(root, cid)):
                lazybundle.cleanup(sdir)
        return rc
    except BaseException:
        lazybundle.cleanup(sdir)
        raise


def _rewrite_create_argv(ctx: Ctx, items, pi: int, private: str, bundle: str) -> list[str]:
    """The caller's argv with `--bundle PRIVATE`; a relative --console-socket is resolved
    against the caller's bundle (the delegate chdirs into the bundle before dialling it)."""
    out = ctx.argv[:ctx.vi + 1] + ["--bundle", private]
    for name, value, start, end in items:
        if name in ("bundle", "b"):
            continue
        if name == "console-socket" and value and not value.startswith("/"):
            out += [f"--console-socket={os.path.join(bundle, value)}"]
            continue
        out += ctx.rest[start:end]
    return out + ["--"] * (pi > 0 and ctx.rest[pi - 1] == "--") + ctx.rest[pi:]


def _lazy_container(ctx: Ctx) -> tuple[str, str] | None:
    """(state dir, caller's bundle) when the verb's one argument is a lazy container of ours."""
    try:
        items, pi = parse_flags(ctx.rest, frozenset())
    except Usage:
        return None
    from .paths import valid_id

    ids = ctx.rest[pi:]
    if len(ids) != 1 or not valid_id(ids[0]):
        return None
    sdir = ctx.state_dir(ids[0])
    try:
        with open(os.path.join(sdir, "orig-bundle")) as f:
            return sdir, f.read()
    except OSError:
        return None


def _state(ctx: Ctx) -> int | None:
    hit = _lazy_container(ctx)
    if hit is None:
        return None
    sdir, bundle = hit
    rc, out = spawn_capture(ctx.delegate_argv())
    _write_stdout(_unprivate(out, [(os.path.join(sdir, "bundle"), bundle)]))
    _quick_exit(rc)
    return rc


def _list(ctx: Ctx) -> int | None:
    from .paths import root_key, runtime_dir

    top = os.path.join(runtime_dir(), "oci", root_key(ctx.root))
    pairs = []
    try:
        names = os.listdir(top)
    except OSError:
        return None
    for name in names:
        try:
            with open(os.path.join(top, name, "orig-bundle")) as f:
                pairs.append((os.path.join(top, name, "bundle"), f.read()))
        except OSError:
            continue
    if not pairs:
        return None
    rc, out = spawn_capture(ctx.delegate_argv())
    if out.startswith(b"ID ") and b" BUNDLE " in out.split(b"\n", 1)[0]:
        out = _retable(out, pairs)
    else:
        out = _unprivate(out, pairs)
    _write_stdout(out)
    _quick_exit(rc)
    return rc


def _retable(out: bytes, pairs: list[tuple[str, str]]) -> bytes:
    """runc's table (Go tabwriter: min width 12, padding 3) with the bundle column swapped."""
    swap = {os.fsencode(p): os.fsencode(b) for p, b in pairs}
    lines = out.split(b"\n")
    header = lines[0]
    starts = [i for i in range(len(header)) if header[i] != 32 and (i == 0 or header[i - 1] == 32)]
    bounds = list(zip(starts, starts[1:] + [None], strict=True))
    rows = [[swap.get(c, c) for c in (line[s:e].rstrip() for s, e in bounds)] for line in lines if line]
    widths = [max(12, max(len(r[i]) for r in rows) + 3) for i in range(len(bounds) - 1)]
    text = [b"".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + r[-1] for r in rows]
    return b"\n".join(text) + b"\n"


def _unprivate(out: bytes, pairs: list[tuple[str, str]]) -> bytes:
    """Put the caller's bundle paths back where the delegate printed our private ones."""
    for private, bundle in pairs:
        out = out.replace(os.fsencode(private), os.fsencode(bundle))
    return out


def _delete(ctx: Ctx) -> int | None:
    hit = _lazy_container(ctx)
    if hit is None:
        return None
    sdir, _ = hit
    rc = spawn(ctx.delegate_argv())
    cid = os.path.basename(sdir)
    if rc == 0 or not os.path.lexists(os.path.join(ctx.root, cid)):
        from . import lazybundle

        lazybundle.cleanup(sdir)
    return rc


def _exec(ctx: Ctx) -> int | None:
    """exec into a lazy container under the ptrace backend runs the delegate as a tracee of
    its supervisor (runtime.traced_exec); any other exec is a plain execv."""
    try:
        _items, pi = parse_flags(ctx.rest, EXEC_VALUE | {"pidfd-socket"})
    except Usage:
        return None
    from .paths import valid_id

    if pi >= len(ctx.rest) or not valid_id(ctx.rest[pi]):
        return None
    from .traced_exec import run_traced, traced_socket

    sock = traced_socket(ctx.state_dir(ctx.rest[pi]))
    if sock is None:
        return None
    sys.stdout.flush()
    return run_traced(ctx.delegate_argv(), sock)


HANDLERS = {
    "create": _create,
    "run": _create,
    "exec": _exec,
    "state": _state,
    "list": _list,
    "ls": _list,
    "delete": _delete,
}


# ---- running the delegate as a child (only where we have work to do afterwards) ----------
def spawn(argv: list[str]) -> int:
    """Run argv with our stdio and every inheritable fd; its exit status as ours."""
    sys.stdout.flush()
    pid = os.posix_spawn(argv[0], argv, os.environ)
    return _wait(pid)


def spawn_capture(argv: list[str]) -> tuple[int, bytes]:
    r, w = os.pipe()
    try:
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, w, 1)])
    finally:
        os.close(w)
    chunks = []
    with open(r, "rb", buffering=0) as f:
        while chunk := f.read(65536):
            chunks.append(chunk)
    return _wait(pid), b"".join(chunks)


def spawn_forwarding(argv: list[str]) -> int:
    """Run argv in the foreground and pass on every signal sent to us with kill(2)."""
    import signal

    from .sigproxy import spawn_forwarding as spawn

    forward = set(range(1, signal.NSIG)) - {signal.SIGKILL, signal.SIGSTOP, signal.SIGCHLD,
                                             signal.SIGTTIN, signal.SIGTTOU, signal.SIGTSTP}
    sys.stdout.flush()
    return spawn(argv, {s for s in forward if s not in (32, 33)})  # 32, 33: glibc-internal


def _wait(pid: int) -> int:
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            return _status(status)
        except InterruptedError:
            continue


def _status(status: int) -> int:
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _quick_exit(rc: int) -> None:
    """Leave without interpreter teardown (a few ms that `state` pays per call), as an
    exec'd delegate would; only when running as the `lazyshim` command itself."""
    if os.environ.get("LAZYSHIM_NO_QUICK_EXIT") or not sys.argv or os.path.basename(sys.argv[0]) != "lazyshim":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def _write_stdout(data: bytes) -> None:
    sys.stdout.flush()
    view = memoryview(data)
    while view:
        n = os.write(1, view)
        view = view[n:]
