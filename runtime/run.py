"""`lazyshim run`: run an image now, with its files filled as the container opens them.

Builds a bundle from the image config, mounts a per-container overlay (upper dir over the
shared placeholder trees), attaches the supervisor and hands the bundle to runc/crun's
`run`, keeping the container's stdio and exit code.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

from shim import api
from shim.errors import LazyshimError

from . import agent_policy, attach, overlay, spec
from .delegate import find_delegate


def run(args) -> int:
    _check_flags(args)
    profile = _seccomp_profile(args.security_opt)
    store = api.open_store()
    image = api.ensure_image(store, args.image, pull=not args.no_pull)
    settings = spec.image_settings(image.config, args.image)  # checked before anything is mounted
    from shim.lazyroot import layers_complete

    lazy = not layers_complete(store, image.layers)  # a fully filled image runs natively
    cid = args.name or secrets.token_hex(8)
    # A profile with its own seccomp agent keeps it: refused (if asked) before anything is made.
    agent = agent_policy.foreign_reason({"linux": {"seccomp": profile}}) if lazy else None
    if agent is not None:
        agent_policy.check_allowed({}, agent, f"container {cid}")
    cdir = store.containers / cid
    if cdir.exists():
        raise LazyshimError(f"container {cid!r} already exists")
    for sub in ("upper", "work", "rootfs", "bundle"):
        (cdir / sub).mkdir(parents=True, mode=0o755)
    mounted = False
    try:
        from shim.userns import in_user_namespace

        overlay.mount_overlay(api.layer_trees(store, image), cdir / "upper", cdir / "work", cdir / "rootfs",
                              userxattr=in_user_namespace())
        mounted = True
        args_ = spec.process_args(settings, list(args.command), args.entrypoint)
        if not args_:
            raise LazyshimError(f"{args.image}: no command given and the image has none")
        uid, gid = api.resolve_user(store, image, cdir / "rootfs", args.user or settings.user)
        if not (0 <= uid <= MAX_ID and 0 <= gid <= MAX_ID):
            raise LazyshimError(f"user {args.user or settings.user!r}: uid/gid out of range (0-{MAX_ID})")
        config = spec.build_spec(
            rootfs=str(cdir / "rootfs"), args=args_, env=spec.merged_env(settings, list(args.env)),
            cwd=args.workdir or settings.workdir or "/",
            uid=uid, gid=gid, hostname=cid[:12], terminal=args.tty, network=args.network,
        )
        if args.network == "bridge":
            from shim.userns import in_user_namespace

            if in_user_namespace():
                raise LazyshimError("--network bridge needs root; rootless containers use none or host")
            from . import network

            config.setdefault("hooks", {}).setdefault("createRuntime", []).append(network.hook(cid))
        if profile is not None:
            config["linux"]["seccomp"] = profile
        if agent is not None:  # the image in full, no supervisor: the agent gets its notifications
            agent_policy.complete_for_agent(config, agent, store.root, image.layers, f"container {cid}")
        elif lazy:
            attach.attach(config, cid, store.root, image.layers, cdir / "rootfs",
                          background="none" if args.no_background_fetch else None,
                          record=Path(args.record) if args.record else None)
        (cdir / "bundle" / "config.json").write_text(json.dumps(config, indent=1))
        delegate = find_delegate()
        cmd = [delegate, "--root", str(attach.runtime_dir() / "delegate"), "run", "--bundle",
               str(cdir / "bundle"), cid]
        sys.stdout.flush()
        rc = subprocess.call(cmd, stdin=None if args.interactive or args.tty else subprocess.DEVNULL)
        return rc
    finally:
        attach.stop_supervisor(cid)
        if args.network == "bridge":
            from . import network

            network.release(cid)
        if args.rm:
            if mounted:
                overlay.unmount(cdir / "rootfs")
            shutil.rmtree(cdir, ignore_errors=True)
        elif mounted:
            overlay.unmount(cdir / "rootfs")


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
    p.add_argument("-i", "--interactive", action="store_true")
    p.add_argument("-t", "--tty", action="store_true")
    p.add_argument("--name")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K=V")
    p.add_argument("-u", "--user")
    p.add_argument("-w", "--workdir")
    p.add_argument("--entrypoint", type=lambda s: [s] if s else [])
    p.add_argument("--network", choices=("none", "host", "bridge"), default="none")
    p.add_argument("--no-pull", action="store_true", help="fail if the image is not pulled yet")
    p.add_argument("--record", help=argparse.SUPPRESS)  # used by `lazyshim record`
    p.add_argument("--security-opt", action="append", default=[], metavar="seccomp=PROFILE|unconfined",
                   help="seccomp profile (default: the containers default profile when installed)")
    p.add_argument("--no-background-fetch", action="store_true",
                   help="fetch only what the container opens (default: the rest follows in the background)")
    p.add_argument("image")
    p.add_argument("command", nargs=argparse.REMAINDER)
    p.set_defaults(func=run)
