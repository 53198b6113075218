"""`lazyshim info`: the effective configuration and what this host gives lazyshim.

Which value each setting has and where it came from (environment, a config file, the
default), the store in use and its layout, the delegate runtime, the supervisor's
mechanism, and the kernel features lazyshim relies on or could use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

DEFAULTS = {"background_fetch": "all", "insecure_registries": "", "registry_retries": "3",
            "registry_timeout": "30", "fetch_timeout": "30", "trap": "auto"}


def _kernel_at_least(release: str, want: tuple[int, int]) -> bool:
    try:
        major, minor = (int(x) for x in release.split("-")[0].split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= want


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def kernel() -> dict:
    release = os.uname().release
    actions = _read("/proc/sys/kernel/seccomp/actions_avail").split()
    return {
        "release": release,
        "seccomp_user_notif": "user_notif" in actions,
        "seccomp_notif_sync_wakeup": _kernel_at_least(release, (6, 6)),
        "overlay_data_only_lowers": _kernel_at_least(release, (6, 5)),
        "fanotify_pre_content": _kernel_at_least(release, (6, 14)),
        "user_namespaces": (_read("/proc/sys/user/max_user_namespaces") or "0") != "0",
    }


def gather() -> dict:
    from shim import api, config
    from shim.userns import in_user_namespace

    from . import paths
    from .delegate import _cgroup_mode, find_delegate

    settings = {}
    for key, (value, source) in config.effective().items():
        settings[key] = {"value": value if value is not None else DEFAULTS.get(key), "source": source}
    store = api.open_store()
    settings["root"]["value"] = str(store.root)
    settings["runtime_dir"]["value"] = paths.runtime_dir()
    try:
        delegate = find_delegate()
        version = subprocess.run([delegate, "--version"], capture_output=True, text=True, timeout=10).stdout
        delegate_info = {"path": delegate, "version": (version.splitlines() or [""])[0]}
    except Exception as e:  # noqa: BLE001 - reported, not fatal: info is for finding such problems
        delegate_info = {"path": None, "error": str(e)}
    settings["delegate"]["value"] = delegate_info.get("path")
    k = kernel()
    supervisor = _trap(delegate_info.get("path"))
    from .oci import VERSION

    return {
        "version": VERSION,
        "config_files": {p: os.path.exists(p) for p in config.files()},
        "settings": settings,
        "store": {"root": str(store.root), "layout": api.store_layout(store)},
        "delegate": delegate_info,
        "supervisor": supervisor,
        "rootless": in_user_namespace() or os.geteuid() != 0,
        "cgroups": _cgroup_mode(),
        "kernel": k,
    }


def _trap(delegate: str | None) -> str:
    """The trap backend a lazy container would get now, and why."""
    from . import trap

    try:
        mode = trap.configured()
        chosen = trap.choose(delegate) if delegate else "ptrace"
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        return f"unavailable ({e})"
    what = {"notify": "seccomp user notification", "ptrace": "ptrace (SECCOMP_RET_TRACE)"}[chosen]
    return what if mode != "auto" else f"{what} (auto)"


def cmd_info(args) -> int:
    doc = gather()
    if args.format == "json":
        json.dump(doc, sys.stdout, indent=2)
        print()
        return 0
    print(f"lazyshim {doc['version']}")
    print("config files:")
    for path, present in doc["config_files"].items():
        print(f"  {path}{'' if present else '  (absent)'}")
    print("settings:")
    width = max(len(k) for k in doc["settings"])
    for key, s in doc["settings"].items():
        print(f"  {key.ljust(width)}  {s['value'] if s['value'] not in (None, '') else '-'}  ({s['source']})")
    print(f"store: {doc['store']['root']}, layout {doc['store']['layout']}")
    d = doc["delegate"]
    print(f"delegate: {d['path']} ({d.get('version') or d.get('error')})")
    print(f"supervisor: {doc['supervisor']}")
    print(f"rootless: {'yes' if doc['rootless'] else 'no'}; cgroups: {doc['cgroups']}")
    print(f"kernel {doc['kernel']['release']}:")
    for key, value in doc["kernel"].items():
        if key != "release":
            print(f"  {key}: {'yes' if value else 'no'}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="show the effective configuration and what the host supports")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_info)
