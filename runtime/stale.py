"""Recognise and remove what a killed lazyshim left behind.

Run on every `lazyshim` command that opens the store (and on demand by `lazyshim gc`):
- standalone containers whose owner is gone (nobody holds the container dir's lock, see
  `runtime.containers`): the delegate's container is killed and deleted, the supervisor
  stopped, the overlay unmounted; `--rm` containers are removed, others keep their upper
  dir and get an exit code (137) so `ps -a` shows them stopped;
- half-made container dirs (`~new.<pid>.<id>`) of a dead pid;
- standalone state dirs under the runtime dir whose owning container dir is gone;
- runc-path state dirs (`RUNTIME_DIR/oci/<root>/<id>`) whose supervisor is dead and whose
  container the delegate no longer knows (an engine's `delete` that never came);
- the store's own temporaries (`shim.store.sweep`), with whatever a dead maker left mounted
  inside them (detached first, never deleted through).

Not swept: the store's metadata tmpfs and its read-only layer views (layout v2), which belong
to the store's layers, not to a process; `lazyshim gc` detaches them once no layer is left.

Nothing that a live process owns is touched: ownership is a lock or a live pid, never a
guess from timestamps.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import containers, paths


def sweep(store) -> list[str]:
    """Sweep the store and the runtime dir; one line per thing removed."""
    from shim.store.sweep import sweep_temporaries

    removed = _sweep_containers(store.containers)
    removed += _sweep_state_dirs(Path(paths.runtime_dir()))
    removed += sweep_temporaries(store)
    return removed


def sweep_quietly(store) -> None:
    """The automatic sweep: never fails the command that triggered it."""
    try:
        sweep(store)
    except Exception as e:  # noqa: BLE001 - a failed sweep is reported, the command goes on
        print(f"lazyshim: warning: sweeping stale state: {e}", file=sys.stderr)


def _sweep_containers(top: Path) -> list[str]:
    removed: list[str] = []
    try:
        names = os.listdir(top)
    except OSError:
        return removed
    from shim.store.sweep import pid_alive, remove_tree

    for name in names:
        if name.startswith(containers.CLAIM_PREFIX):
            pid = name[len(containers.CLAIM_PREFIX):].partition(".")[0]
            if pid.isdigit() and not pid_alive(int(pid)) and remove_tree(top / name):
                removed.append(f"half-made container {top / name}")
    for cdir in containers.list_dirs(top):
        if _sweep_container(cdir):
            removed.append(f"container {cdir.name}")
    return removed


def _sweep_container(cdir: Path) -> bool:
    """Tear down one container if its owner is gone and something of it is left."""
    rec = containers.load(cdir)
    if rec is None:
        return False  # not a container this runtime made
    if not _leftovers(cdir, rec):
        return False  # a stopped container, already torn down
    fd = containers.try_own(cdir)
    if fd is None:
        return False  # alive (or another sweeper is at it)
    try:
        containers.teardown(cdir, rec, None, remove=rec.rm)
    finally:
        os.close(fd)
    return True


def _leftovers(cdir: Path, rec: containers.Record) -> bool:
    from . import bigmount

    return (rec.rm or containers.exit_code(cdir) is None or os.path.ismount(cdir / "rootfs") or bigmount.mounted(cdir)
            or os.path.isdir(rec.state_dir) or containers.delegate_has(rec))


def _sweep_state_dirs(rtdir: Path) -> list[str]:
    removed: list[str] = []
    try:
        names = os.listdir(rtdir)
    except OSError:
        return removed
    for name in names:
        if name in paths.RESERVED or not paths.valid_id(name):
            continue
        sdir = rtdir / name
        try:
            owner = Path((sdir / containers.OWNER).read_text())
        except OSError:
            continue  # being made, or not ours: an owner file is written right after mkdir
        if owner.is_dir():
            if _sweep_container(owner):
                removed.append(f"container {name}")
            continue
        from . import attach

        attach.stop_supervisor(name, sdir=sdir)
        removed.append(f"state dir {sdir}")
    removed += _sweep_oci_state(rtdir / "oci")
    return removed


def _sweep_oci_state(top: Path) -> list[str]:
    removed: list[str] = []
    try:
        keys = os.listdir(top)
    except OSError:
        return removed
    for key in keys:
        root = key.replace("%2F", "/").replace("%25", "%")
        try:
            ids = os.listdir(top / key)
        except OSError:
            continue
        for cid in ids:
            sdir = top / key / cid
            if not (sdir / "orig-bundle").exists() or os.path.lexists(os.path.join(root, cid)):
                continue  # being created (orig-bundle comes last), or the delegate still has it
            if supervisor_alive(sdir):
                continue
            from . import lazybundle

            lazybundle.cleanup(str(sdir))
            removed.append(f"state dir {sdir}")
    return removed


def supervisor_alive(sdir: Path) -> bool:
    try:
        pid = int((sdir / "supervisor.pid").read_text())
        if b"shim.supervisor" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return False
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1] != "Z"
    except (OSError, ValueError, IndexError):
        return False


def cmd_gc(args) -> int:
    """`lazyshim gc [--max-size SIZE]`: the sweep, then layers no image or mount uses, then
    (with a cap) the least recently used file data no mounted layer names, then the store's
    own mounts once no layer is left; says what went."""
    from shim import api, config
    from shim.store.gc import collect, collect_data, evict_data
    from shim.store.sweep import release_unused_mounts

    from .runflags import memory

    cap_text = args.max_size or config.get("store_max_size")
    cap = memory(cap_text, what="--max-size" if args.max_size else "store_max_size", zero=True) \
        if cap_text else None
    store = api.open_store()
    removed = sweep(store) + [f"layer {name}" for name in collect(store)]
    files, size = collect_data(store)
    if files:
        removed.append(f"{files} data file(s) no layer names ({size} bytes)")
    if cap is not None:
        ev = evict_data(store, cap)
        if ev is None:
            print("lazyshim: --max-size: this store's layout keeps file data in its layer trees; nothing evicted",
                  file=sys.stderr)
        else:
            if ev.files:
                removed.append(f"{ev.files} least recently used data file(s) ({ev.bytes} bytes)")
            if ev.kept_bytes > cap:
                print(f"lazyshim: data still takes {ev.kept_bytes} bytes: {ev.pinned_bytes} of them belong to "
                      "layers in use by containers", file=sys.stderr)
    removed += release_unused_mounts(store)
    for line in removed:
        print(f"removed {line}")
    if not removed:
        print("nothing to remove")
    note = api.kept_profiles_note(store)
    if note:
        print(note, file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("gc", help="remove stale containers, mounts, state and unused layers")
    p.add_argument("--max-size", metavar="SIZE",
                   help="also evict least recently used file data until it takes at most SIZE (e.g. 20g); "
                        "default: the config's store_max_size")
    p.set_defaults(func=cmd_gc)


def sweep_before(verb: str | None) -> None:
    """The automatic sweep, once per command that uses the store (not for help)."""
    if verb in (None, "help", "convert", "completion"):
        return
    from shim.store.layout import Store

    store = Store()
    if store.root.is_dir():
        sweep_quietly(store)
