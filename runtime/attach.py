"""Give a bundle its supervisor: patch the seccomp profile, start the supervisor, prefill.

Called before the delegate's `create` (or `run`): the socket is bound and listening here
and passed to the supervisor, which reports readiness on a pipe, so runc always finds a
listener and we never wait on a timer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

from seccomp.ptrace_profile import add_hook, trace_profile
from seccomp.verdict import OWN_METADATA, patch_profile
from shim import config as settings
from shim.errors import LazyshimError

from . import paths
from .traced_exec import TRAP_FILE
from .trap import choose as choose_trap


def runtime_dir() -> Path:
    return Path(paths.runtime_dir())


def state_dir(container_id: str) -> Path:
    if not paths.valid_id(container_id) or container_id in paths.RESERVED:
        raise LazyshimError(f"invalid container ID format: {container_id!r}")
    return runtime_dir() / container_id


#: How long a supervisor may take to write its profile before it is stopped (a bound for a hung one).
FINISH_TIMEOUT = 10.0
BACKGROUND_ANNOTATION = "run.lazyshim.background-fetch"
BACKGROUND_MODES = ("none", "prioritized", "all")


def background_mode(config: dict, explicit: str | None = None) -> str:
    """What the supervisor fetches unasked: the caller's choice, else the bundle's
    annotation, else $LAZYSHIM_BACKGROUND_FETCH, else everything."""
    mode = explicit or (config.get("annotations") or {}).get(BACKGROUND_ANNOTATION) \
        or settings.get("background_fetch") or "all"
    if mode not in BACKGROUND_MODES:
        raise LazyshimError(f"background fetch mode {mode!r} is not one of {', '.join(BACKGROUND_MODES)}")
    return mode


def attach(config: dict, container_id: str, store_root: Path, layers: list[str], rootfs: Path,
           metadata: str = OWN_METADATA, sdir: Path | None = None, background: str | None = None,
           record: Path | None = None, sources: list[str] | None = None, trap: str | None = None,
           big_threshold: int = 0, image_id: str | None = None, big_record: Path | None = None,
           demand: Path | None = None) -> int:
    """Patch `config` in place and start the supervisor; returns its pid.

    `sdir` is the container's state directory (default: the standalone one for the id).
    `sources`: the references of the image the container runs, which its fills read from
    (without them the supervisor finds the images of `layers` in the store).  `trap`:
    `notify` or `ptrace` (default: as `runtime.trap` chooses).  Under ptrace the socket
    takes the createRuntime hook's connection instead of the delegate's listener fd.
    `big_threshold`: the container has a FUSE layer of big files (`runtime.bigmount`) that
    serves the files this big: the supervisor leaves them to it; `big_record`: where that
    layer records the chunks it saw touched, which the supervisor merges into the profile;
    `demand`: the board that layer and the supervisor share (`shim.demand`), so that neither's
    background fetch takes the link while the other serves a reader.
    `image_id`: the image's, whose start-up profile the supervisor learns and uses (without
    it: the image made of `layers`); unless profiles are off.
    """
    starting = start(config, container_id, store_root, layers, rootfs, metadata=metadata, sdir=sdir,
                     background=background, record=record, sources=sources, trap=trap,
                     big_threshold=big_threshold, image_id=image_id, big_record=big_record, demand=demand)
    pid = starting.go()
    starting.patch(config)
    return pid


class Starting:
    """A supervisor started before its container's rootfs is mounted.

    It imports its modules and loads the layers' metadata meanwhile, then waits for `go`
    (the rootfs is there) before it checks the rootfs and prefills, and reports ready.  If
    the runtime gives up first (an error, a signal), `abandon` (or this process's exit)
    closes the go pipe and the supervisor ends without touching anything."""

    def __init__(self, proc: subprocess.Popen, ready_r: int, go_w: int, sdir: Path, profile: dict,
                 hook_socket: str | None) -> None:
        self.proc = proc
        self.sdir = sdir
        self._ready_r: int | None = ready_r
        self._go_w: int | None = go_w
        self._profile = profile
        self._hook_socket = hook_socket  # ptrace: the createRuntime hook connects here

    def go(self) -> int:
        """The rootfs is mounted: let the supervisor prefill; returns its pid once it serves,
        or raises the one-line error its log ends with."""
        assert self._go_w is not None and self._ready_r is not None
        try:
            os.write(self._go_w, b"1")
        except OSError:
            pass  # it is gone already: the ready pipe says so
        finally:
            os.close(self._go_w)
            self._go_w = None
        try:
            ok = os.read(self._ready_r, 1) == b"1"
        finally:
            os.close(self._ready_r)
            self._ready_r = None
        if not ok:
            self.proc.wait()
            raise LazyshimError(f"supervisor failed to start: {last_log_line(self.sdir / 'supervisor.log')}")
        return self.proc.pid

    def patch(self, config: dict) -> None:
        """Give the container's config the seccomp profile (and hook) this supervisor serves."""
        config.setdefault("linux", {})["seccomp"] = self._profile
        if self._hook_socket is not None:
            add_hook(config, self._hook_socket)

    def abandon(self) -> None:
        """The container will not be made: the supervisor ends (EOF on its go pipe)."""
        for fd in (self._go_w, self._ready_r):
            if fd is not None:
                os.close(fd)
        self._go_w = self._ready_r = None


def start(config: dict, container_id: str, store_root: Path, layers: list[str], rootfs: Path,
          metadata: str = OWN_METADATA, sdir: Path | None = None, background: str | None = None,
          record: Path | None = None, sources: list[str] | None = None, trap: str | None = None,
          big_threshold: int = 0, image_id: str | None = None, big_record: Path | None = None,
          demand: Path | None = None) -> Starting:
    """Start the supervisor of a container whose rootfs (at `rootfs`) is not mounted yet.

    `config` needs only what the supervisor is started with: `linux.seccomp` (the user's
    profile, if any), `process` (args, env, cwd) and `annotations`; the container's full
    config gets the patched profile from `Starting.patch`.  Its pid file is written before
    this returns, so a teardown from here on stops it.  The rest as for `attach`."""
    mode = background_mode(config, background)
    trap = trap or choose_trap()
    sdir = Path(sdir) if sdir is not None else state_dir(container_id)
    sdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    sock_path = _socket_path(sdir)
    user_profile = (config.get("linux") or {}).get("seccomp")
    if trap == "ptrace":
        profile, verdicts = trace_profile(user_profile)
    else:
        profile, verdicts = patch_profile(user_profile, str(sock_path), metadata)
    (sdir / "verdicts.json").write_text(verdicts.to_json())
    (sdir / TRAP_FILE).write_text(trap)  # `exec` must know: under ptrace it needs the tracer first

    with _bound_socket(sock_path) as listener:  # the supervisor keeps it listening: ours is closed after
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()
        args = config.get("process", {}).get("args") or []
        argv = [
            sys.executable, "-m", "shim.supervisor",
            "--store", str(store_root), "--layers", ",".join(layers),
            "--listen-fd", str(listener.fileno()), "--state-dir", str(sdir),
            "--ready-fd", str(ready_w), "--go-fd", str(go_r), "--rootfs", str(rootfs),
            "--prefill", "/etc/passwd:/etc/group",
            "--prefill-exec-candidates", _exec_path(args[0], config) if args else "",
            "--background", mode, "--trap", trap,
        ] + (["--big-threshold", str(big_threshold)] if big_threshold else []) \
          + (["--big-record", str(big_record)] if big_record else []) \
          + (["--demand", str(demand)] if demand else []) \
          + (["--record", str(record)] if record else []) + (["--sources", ",".join(sources)] if sources else [])
        argv += _profile_args(config, image_id)
        from shim.trace import mark

        mark("runtime", "supervisor spawn")
        try:
            proc = spawn_daemon(argv, ready_w, sdir / "supervisor.pid", pass_fds=(listener.fileno(), go_r))
        except BaseException:
            os.close(ready_r)
            os.close(go_w)
            raise
        finally:
            os.close(go_r)
    return Starting(proc, ready_r, go_w, sdir, profile, str(sock_path) if trap == "ptrace" else None)


def _profile_args(config: dict, image_id: str | None) -> list[str]:
    """The supervisor's start-up profile flags: the workload is its argv and working dir."""
    process = config.get("process") or {}
    return profile_flags(process.get("args") or [], process.get("cwd") or "/", image_id)


def profile_flags(args: list, cwd: str, image_id: str | None) -> list[str]:
    """The start-up profile flags of a helper (the supervisor, the FUSE layer of big files) for
    the workload `args` run in `cwd`: both must name the same profile.  None if profiles are off."""
    from shim import api

    if not api.profiles_enabled():
        return []
    command = {"args": [str(x) for x in args], "cwd": str(cwd or "/")}
    return ["--profile-command", json.dumps(command)] + (["--profile-image", image_id] if image_id else [])


def supervisor_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k in ("PATH", "HOME", "XDG_RUNTIME_DIR", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "REGISTRY_AUTH_FILE",
                    "CONTAINERS_REGISTRIES_CONF")
           or k.startswith("LAZYSHIM_")}
    # The supervisor imports our packages from wherever this process found them.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _exec_path(arg0: str, config: dict) -> str:
    """The entrypoint, with the container's PATH for the supervisor to search when it has
    no slash (as execvp would); the search itself happens inside the container's root."""
    if "/" in arg0:
        return arg0 if arg0.startswith("/") else "/" + arg0
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for item in config.get("process", {}).get("env") or []:
        if item.startswith("PATH="):
            path = item[5:]
    return ":".join(f"{d.rstrip('/')}/{arg0}" for d in path.split(":") if d.startswith("/"))


def _socket_path(sdir: Path) -> Path:
    """sun_path holds 107 bytes; a 64-hex id under a long --root key does not fit."""
    path = sdir / "seccomp.sock"
    if len(os.fsencode(path)) < 100:
        return path
    import hashlib

    short = runtime_dir() / "sock"
    short.mkdir(parents=True, exist_ok=True, mode=0o700)
    return short / (hashlib.sha256(os.fsencode(sdir)).hexdigest()[:32] + ".sock")


class _bound_socket:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> socket.socket:
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen(16)
        return self.sock

    def __exit__(self, *exc) -> None:
        self.sock.close()


#: How long a stopped supervisor may take to exit before its state dir is removed anyway.
STOP_TIMEOUT = 5.0


def _terminate_and_wait(pid: int, timeout: float) -> None:
    """SIGTERM `pid` and wait (bounded) until it has exited: a supervisor still writing its
    log or statistics while the state dir is removed would leave the dir behind."""
    import select

    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return  # already gone
    try:
        os.kill(pid, signal.SIGTERM)
        select.select([fd], [], [], timeout)  # readable once the process has exited
    finally:
        os.close(fd)


def stop_supervisor(container_id: str, sdir: Path | None = None) -> None:
    """Stop the supervisor of a deleted container and remove its state."""
    sdir = Path(sdir) if sdir is not None else state_dir(container_id)
    from shim.supervisor import control

    control.finish(sdir, FINISH_TIMEOUT)  # its learned profile is written before it goes
    try:
        pid = int((sdir / "supervisor.pid").read_text())
        # The pid may have been reused since the supervisor left: only signal our own.
        if b"shim.supervisor" in Path(f"/proc/{pid}/cmdline").read_bytes():
            _terminate_and_wait(pid, STOP_TIMEOUT)
    except (OSError, ValueError):
        pass
    sock = _socket_path(sdir)
    if sock.parent != sdir:
        sock.unlink(missing_ok=True)
    shutil.rmtree(sdir, ignore_errors=True)


def start_daemon(argv: list[str], ready_r: int, ready_w: int, pid_file: Path,
                 pass_fds: tuple[int, ...] = ()) -> tuple[subprocess.Popen, bool]:
    """Start one of lazyshim's helper processes (`spawn_daemon`) and wait until it serves.
    Returns (process, ready); a process that did not get ready has been reaped.  Closes
    both pipe ends."""
    try:
        proc = spawn_daemon(argv, ready_w, pid_file, pass_fds)
    except BaseException:
        os.close(ready_r)
        raise
    try:
        ok = os.read(ready_r, 1) == b"1"
    finally:
        os.close(ready_r)
    if not ok:
        proc.wait()
    return proc, ok


def spawn_daemon(argv: list[str], ready_w: int, pid_file: Path, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """Start one of lazyshim's helper processes (the supervisor, the big-file FUSE server):
    its own session, no stdio, the supervisor's environment.  It writes b"1" to `ready_w`
    (a pipe whose ends the caller made and named in argv) once it serves.  Its pid is in
    `pid_file` when this returns, so a run interrupted from here on still finds it to stop
    it.  Closes `ready_w`."""
    try:
        proc = subprocess.Popen(argv, pass_fds=(*pass_fds, ready_w), start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                cwd="/", env=supervisor_env())
    finally:
        os.close(ready_w)
    pid_file.write_text(str(proc.pid))
    return proc


def last_log_line(path: Path, prefix: str = "") -> str:
    """The last line of a helper's log (after `prefix`, where it has one), for an error."""
    try:
        lines = path.read_text().strip().splitlines()
    except OSError:
        return "no log"
    if not lines:
        return "no log"
    return lines[-1].partition(prefix)[2] or lines[-1] if prefix else lines[-1]
