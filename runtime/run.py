"""`lazyshim run`: run an image now, with its files filled as the container opens them.

Builds a bundle from the image config, mounts a per-container overlay (upper dir over the
shared placeholder trees), attaches the supervisor and hands the bundle to runc/crun's
`run`, keeping the container's stdio and exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from shim import api
from shim.errors import LazyshimError
from shim.trace import mark

from . import agent_policy, attach, bigmount, containers, overlay, runflags, sigproxy, spec
from .delegate import find_delegate


def run(args) -> int:
    """Run the container; whatever ends the run (its exit, a signal, an error of ours), the
    teardown leaves nothing running or mounted, and with --rm nothing at all."""
    _check_flags(args)
    if args.detach:
        return _run_detached(args)
    guard = sigproxy.Guard()
    try:
        return _run(args, guard)
    except sigproxy.Interrupted as e:
        return e.exit_code
    finally:
        guard.restore()


def _run_detached(args) -> int:
    """-d: the image is pulled here (its errors and progress are the caller's); the
    container runs under a monitor of its own."""
    if args.tty:
        raise LazyshimError("-d with -t is not supported (no console to attach later)")
    _seccomp_profile(args.security_opt)  # a bad profile is the caller's error, not the monitor's
    store = api.open_store()
    _image(store, args)
    args.pull, args.no_pull = "never", True
    args.name = args.name or os.urandom(8).hex()  # secrets.token_hex without its imports
    from . import detach

    def body(monitor) -> int:
        guard = sigproxy.Guard()
        try:
            return _run(args, guard, monitor)
        except sigproxy.Interrupted as e:
            return e.exit_code
    return detach.start(args.name, body)


def _image(store, args):
    policy = "never" if args.no_pull else args.pull
    return api.ensure_image(store, args.image, pull=policy != "never", always=policy == "always", progress=True)


def _run(args, guard: sigproxy.Guard, monitor=None) -> int:
    profile = _seccomp_profile(args.security_opt)
    store = api.open_store()
    mark("runtime", "store open")
    image = _image(store, args)
    mark("runtime", "image")
    settings = spec.image_settings(image.config, args.image)  # checked before anything is mounted
    lazy = not api.layers_complete_in(store, image.layers)  # a fully filled image runs natively
    mark("runtime", "layers_complete")
    cid = args.name or os.urandom(8).hex()  # secrets.token_hex without its imports
    # A profile with its own seccomp agent keeps it: refused (if asked) before anything is made.
    agent = agent_policy.foreign_reason({"linux": {"seccomp": profile}}) if lazy else None
    if agent is not None:
        agent_policy.check_allowed({}, agent, f"container {cid}")
    delegate = find_delegate()
    record = containers.Record(
        id=cid, name=args.name or "", image=args.image, image_id=image.id, command=list(args.command),
        created=time.time(), rm=args.rm, delegate=delegate, delegate_root=str(attach.runtime_dir() / "delegate"),
        state_dir=str(attach.state_dir(cid)), network=args.network, detach=monitor is not None)
    owned = containers.create(store.containers, record)
    cdir = owned.cdir
    rc: int | None = None
    starting: attach.Starting | None = None
    try:
        if monitor is not None:
            record.log = str(cdir / containers.LOG)
            owned.save()
            monitor.redirect(Path(record.log))
        containers.claim_state_dir(owned)
        mark("runtime", "container dir")
        from shim.userns import in_user_namespace

        args_ = spec.process_args(settings, list(args.command), args.entrypoint)
        if not args_:
            raise LazyshimError(f"{args.image}: no command given and the image has none")
        if args.network == "bridge" and in_user_namespace():
            raise LazyshimError("--network bridge needs root; rootless containers use none or host")
        env = spec.merged_env(settings, _env(args))
        cwd = args.workdir or settings.workdir or "/"
        lower = api.layer_mount(store, image)
        mark("runtime", "layer_mount")
        sources = api.image_sources(store, image, args.image)
        mark("runtime", "image_sources")
        # Big files read sparsely go through the container's FUSE layer, the last data-only lower.
        background = attach.background_mode({}, "none" if args.no_background_fetch else None)
        big = bigmount.start(store.root, image.layers, sources, cdir, background=background,
                             profile=attach.profile_flags(args_, cwd, image.id)) \
            if lazy and agent is None and lower.data_lowers else None
        mark("runtime", "bigmount")
        # The supervisor starts now, loading the layers while the overlay is mounted; it looks
        # at the rootfs only once `go` says it is there.
        starting = attach.start({"linux": {"seccomp": profile}, "process": {"args": args_, "env": env, "cwd": cwd}},
                                cid, store.root, image.layers, cdir / "rootfs",
                                background=background, record=Path(args.record) if args.record else None,
                                sources=sources, big_threshold=big[1] if big else 0, image_id=image.id,
                                big_record=bigmount.record_path(cdir) if big else None,
                                demand=bigmount.demand_path(cdir) if big else None) \
            if lazy and agent is None else None
        overlay.mount_overlay(lower.lowers, cdir / "upper", cdir / "work", cdir / "rootfs",
                              userxattr=in_user_namespace(), data_lowers=[*lower.data_lowers, *big[:1]] if big
                              else lower.data_lowers, options=lower.options)
        mark("runtime", "overlay")
        if starting is not None:
            starting.go()  # ready: /etc/passwd and /etc/group are filled, which resolve_user reads
            mark("runtime", "supervisor ready")
        uid, gid = api.resolve_user(store, image, cdir / "rootfs", args.user or settings.user,
                                    filled=not lazy or starting is not None)
        if not (0 <= uid <= MAX_ID and 0 <= gid <= MAX_ID):
            raise LazyshimError(f"user {args.user or settings.user!r}: uid/gid out of range (0-{MAX_ID})")
        mark("runtime", "resolve_user")
        config = spec.build_spec(
            rootfs=str(cdir / "rootfs"), args=args_, env=env, cwd=cwd,
            uid=uid, gid=gid, hostname=args.hostname or cid[:12], terminal=args.tty, network=args.network,
        )
        _apply_run_flags(config, args)
        mark("runtime", "spec")
        if args.network == "bridge":
            from . import network

            config.setdefault("hooks", {}).setdefault("createRuntime", []).append(network.hook(cid))
        if profile is not None:
            config["linux"]["seccomp"] = profile
        if agent is not None:  # the image in full, no supervisor: the agent gets its notifications
            agent_policy.complete_for_agent(config, agent, store.root, image.layers, f"container {cid}")
        elif starting is not None:
            starting.patch(config)
        (cdir / "bundle" / "config.json").write_text(json.dumps(config, indent=1))
        log = cdir / "delegate.log"
        cmd = [delegate, "--root", record.delegate_root, "--log", str(log), "--log-format", "json", "run"]
        bundle = ["--bundle", str(cdir / "bundle"), cid]
        sys.stdout.flush()
        mark("runtime", "delegate run")
        if monitor is not None:
            pid_file = cdir / "init.pid"
            rc = monitor.run_and_wait(cmd + ["--detach", "--pid-file", str(pid_file)] + bundle, pid_file,
                                      lambda: _start_failure(log, 1))
            return rc
        rc = sigproxy.run_forwarding(cmd + bundle, lambda: containers.delegate(record, "kill", cid, "KILL") == 0,
                                     stdin_null=not (args.interactive or args.tty))
        mark("runtime", "delegate exit")
        if rc != 0:
            rc = _start_failure(log, rc)[0]
        return rc
    finally:
        guard.hold()
        if starting is not None:
            starting.abandon()  # not told to go (an error before): it ends by itself, and is stopped
        try:
            containers.teardown(cdir, record, rc, remove=args.rm)
        finally:
            owned.release()
            mark("runtime", "teardown")


def _apply_run_flags(config: dict, args) -> None:
    """-v, --mount, --memory, --cpus, --read-only into the built config."""
    runflags.apply(config, mounts=[runflags.volume(v) for v in args.volume] + [runflags.mount(m) for m in args.mount],
                   memory_limit=runflags.memory(args.memory) if args.memory else None,
                   cpu=runflags.cpus(args.cpus) if args.cpus else None, read_only=args.read_only)


def _env(args) -> list[str]:
    """--env-file entries first, then -e: the later one wins, as in podman."""
    out: list[str] = []
    for f in args.env_file:
        out += runflags.env_file(f)
    return out + list(args.env)


def _start_failure(log: Path, rc: int) -> tuple[int, str]:
    """The delegate logs an error only when it failed itself (the container never ran):
    podman's 125/126/127 then, and the delegate's message; otherwise `rc` is the container's."""
    try:
        lines = log.read_text().strip().splitlines()
        last = json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return rc, "the container did not start"
    if not isinstance(last, dict) or last.get("level") != "error":
        return rc, "the container did not start"
    msg = str(last.get("msg", ""))
    return runflags.exit_code_of_delegate_error(msg), msg


DEFAULT_SECCOMP = Path("/usr/share/containers/seccomp.json")
MAX_ID = (1 << 32) - 2  # uid_t; (uid_t)-1 means "unchanged" to the kernel


def _check_flags(args) -> None:
    """Flags that would otherwise fail deep inside (or, for --name, escape the store)."""
    from .paths import RESERVED, valid_id

    if args.name is not None and (not valid_id(args.name) or args.name in RESERVED):
        raise LazyshimError(f"--name {args.name[:80]!r}: letters, digits and _+-. only (not . or ..)")
    if args.workdir and not args.workdir.startswith("/"):
        raise LazyshimError(f"--workdir must be an absolute path, not {args.workdir!r}")
    for item in args.env:
        if not item.partition("=")[0]:
            raise LazyshimError(f"-e {item[:80]!r}: the variable has no name")


def _seccomp_profile(opts: list[str]) -> dict | None:
    """The profile the user asked for, as podman reads `--security-opt seccomp=...`."""
    choice = None
    for opt in opts:
        key, _, value = opt.partition("=")
        if key != "seccomp" or not value:
            raise LazyshimError(f"unsupported --security-opt {opt!r} (only seccomp=PROFILE|unconfined)")
        choice = value
    if choice == "unconfined":
        return None
    path = Path(choice) if choice else DEFAULT_SECCOMP
    if choice is None and not path.exists():
        return None
    try:
        profile = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LazyshimError(f"seccomp profile {path}: {e}") from e
    if not isinstance(profile, dict):
        raise LazyshimError(f"seccomp profile {path}: not a JSON object")
    return _oci_profile(profile)


def _oci_profile(profile: dict) -> dict:
    """containers' seccomp.json uses archMap and per-rule includes/excludes; the OCI form
    lists architectures and plain rules.  Rules that need capabilities we do not grant, or
    another architecture, are dropped (as podman does for a default container)."""
    if "archMap" not in profile:
        return profile
    from .spec import DEFAULT_CAPS

    arches: list[str] = []
    for m in profile.get("archMap") or []:
        if m.get("architecture") == "SCMP_ARCH_X86_64":
            arches = [m["architecture"], *m.get("subArchitectures", [])]
    rules = []
    for r in profile.get("syscalls") or []:
        inc, exc = r.get("includes") or {}, r.get("excludes") or {}
        if inc.get("caps") and not set(inc["caps"]) <= set(DEFAULT_CAPS):
            continue
        if inc.get("arches") and "amd64" not in inc["arches"] and "x86_64" not in inc["arches"]:
            continue
        if exc.get("caps") and set(exc["caps"]) & set(DEFAULT_CAPS):
            continue
        if exc.get("arches") and ("amd64" in exc["arches"] or "x86_64" in exc["arches"]):
            continue
        rule = {k: v for k, v in r.items() if k not in ("includes", "excludes", "comment")}
        rules.append(rule)
    out = {k: v for k, v in profile.items() if k not in ("archMap", "syscalls")}
    out["architectures"] = arches or ["SCMP_ARCH_X86_64"]
    out["syscalls"] = rules
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run an image with lazily filled files")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("-d", "--detach", action="store_true", help="run in the background and print the id")
    p.add_argument("-i", "--interactive", action="store_true")
    p.add_argument("-t", "--tty", action="store_true")
    p.add_argument("--name")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    p.add_argument("--env-file", action="append", default=[], metavar="FILE", help="KEY=VALUE lines")
    p.add_argument("-v", "--volume", action="append", default=[], metavar="SRC:DST[:ro]",
                   help="bind mount a host path")
    p.add_argument("--mount", action="append", default=[], metavar="type=bind|tmpfs,...",
                   help="type=bind,source=SRC,destination=DST[,ro] or type=tmpfs,destination=DST[,tmpfs-size=N]")
    p.add_argument("--read-only", action="store_true", help="mount the root read-only (tmpfs on /tmp, /var/tmp, /run)")
    p.add_argument("--hostname")
    p.add_argument("-m", "--memory", metavar="SIZE", help="memory limit (e.g. 512m)")
    p.add_argument("--cpus", metavar="N", help="CPU limit (e.g. 1.5)")
    p.add_argument("--pull", choices=("always", "missing", "never"), default="missing")
    p.add_argument("-u", "--user")
    p.add_argument("-w", "--workdir")
    p.add_argument("--entrypoint", type=lambda s: [s] if s else [])
    p.add_argument("--network", choices=("none", "host", "bridge"), default="none")
    p.add_argument("--no-pull", action="store_true", help="same as --pull never")
    p.add_argument("--record", help=argparse.SUPPRESS)  # used by `lazyshim record`
    p.add_argument("--security-opt", action="append", default=[], metavar="seccomp=PROFILE|unconfined",
                   help="seccomp profile (default: the containers default profile when installed)")
    p.add_argument("--no-background-fetch", action="store_true",
                   help="fetch only what the container opens (default: the rest follows in the background)")
    p.add_argument("image")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=run, error_code=125)  # podman's code for errors of its own
