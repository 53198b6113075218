"""Lazy bundles: which bundles get a supervisor, and the private bundle we give the delegate.

A bundle is lazy when
- its `root.path` is an overlay mount with lowerdirs that are layer trees of a lazyshim
  store, in either store layout (`shim.lazyroot.store_of_rootfs`); the store is the one those
  trees live in, whatever $LAZYSHIM_ROOT says (podman and containerd do not pass our
  environment on);
- or its config carries the annotation `run.lazyshim.image=REF` (podman `--annotation`):
  the image is resolved in (or pulled into) the store of $LAZYSHIM_ROOT, and an overlay of
  its trees is mounted on `root.path`, which must then be an empty directory (podman
  `--rootfs DIR`); its upper and work dirs live in the store and go away at `delete`.
Any other bundle passes through untouched, so `lazyshim` is safe as a default runtime.

A lazy bundle whose seccomp profile has its own agent (see `runtime.agent_policy`) gets no
supervisor: its image is filled in full first (or refused), its profile is never touched,
and an overlay bundle then passes through exactly as any other.

The caller's config.json is never modified: the patched copy (seccomp NOTIFY rule and
listenerPath unless the profile has its own agent, root.path and relative bind sources made
absolute) goes to STATE/bundle/.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from shim.errors import LazyshimError

ANNOTATION = "run.lazyshim.image"


@dataclass
class Found:
    bundle: str          # the caller's bundle, absolute, as runc would record it
    config: dict
    rootfs: str          # root.path, absolute
    store_root: str | None = None
    layers: list[str] | None = None
    image: str | None = None  # from the annotation, when the rootfs is not lazy yet


def detect(bundle: str) -> Found | None:
    """The lazy bundle at `bundle`, or None for a bundle to pass through (also for one
    that cannot be read: the delegate reports that in its own words, and for a lazy
    overlay whose profile has its own seccomp agent, once its image is complete)."""
    bundle_abs = os.path.realpath(bundle)
    try:
        with open(os.path.join(bundle_abs, "config.json"), "rb") as f:
            config = json.loads(f.read())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    root = config.get("root")
    path = root.get("path") if isinstance(root, dict) else None
    if not isinstance(path, str) or not path:
        return None
    rootfs = os.path.normpath(os.path.join(bundle_abs, path))
    found = Found(bundle_abs, config, rootfs)
    from shim.lazyroot import store_of_rootfs

    store_root = store_of_rootfs(rootfs)
    if store_root is not None:
        from shim.lazyroot import layers_of_rootfs
        from shim.store.layout import Store

        store = Store(Path(store_root))
        layers = layers_of_rootfs(store, Path(rootfs))
        from shim.lazyroot import layers_complete

        if layers and layers_complete(store, layers):
            return None  # every file is there: the delegate runs it natively, no supervisor
        if layers:
            from . import agent_policy

            reason = agent_policy.foreign_reason(config)
            if reason is not None:
                agent_policy.complete_for_agent(config, reason, Path(store_root), layers, f"bundle {bundle_abs}")
                return None
            found.store_root, found.layers = str(store_root), layers
            return found
    annotations = config.get("annotations")
    image = annotations.get(ANNOTATION) if isinstance(annotations, dict) else None
    if isinstance(image, str) and image:
        found.image = image
        return found
    return None


def prepare(found: Found, container_id: str, sdir: str) -> str:
    """Start the supervisor for `found` and write the private bundle; returns its path."""
    from . import agent_policy, attach, bigmount

    state = Path(sdir)
    if state.exists():
        cleanup(sdir)  # left behind by a create that died half-way: the delegate has no such container
    state.mkdir(parents=True, mode=0o700)
    try:
        config = found.config
        reason = agent_policy.foreign_reason(config)
        store_root, layers, sources, big_threshold, image_id = found.store_root, found.layers, None, 0, None
        if found.image is not None:
            store_root, layers, sources, big_threshold, image_id = _mount_image(found, container_id, state)
        config["root"]["path"] = found.rootfs
        _absolute_bind_sources(config, found.bundle)
        if reason is not None:  # the user's agent keeps its listener: no supervisor, a complete image
            agent_policy.complete_for_agent(config, reason, Path(store_root), list(layers),
                                            f"container {container_id}")
        else:
            scratch = _scratch(state)
            attach.attach(config, container_id, Path(store_root), list(layers), Path(found.rootfs), sdir=state,
                          sources=sources, big_threshold=big_threshold, image_id=image_id,
                          big_record=bigmount.record_path(scratch) if big_threshold and scratch else None,
                          demand=bigmount.demand_path(scratch) if big_threshold and scratch else None)
        private = state / "bundle"
        private.mkdir(mode=0o700)
        (private / "config.json").write_text(json.dumps(config))
        (state / "orig-bundle").write_text(found.bundle)
        return os.path.realpath(private)
    except BaseException:
        cleanup(sdir)
        raise


def _mount_image(found: Found, container_id: str, state: Path) -> tuple[str, list[str], list[str], int, str]:
    """Mount the annotated image on root.path; returns the store, its layers, its references,
    the size from which its FUSE layer serves big files (0: it has none) and the image's id."""
    from shim import api

    from . import agent_policy, bigmount, overlay
    store = api.open_store()
    image = api.ensure_image(store, found.image)
    if not os.path.isdir(found.rootfs):
        raise LazyshimError(f"{ANNOTATION}: root.path {found.rootfs} does not exist")
    if os.path.ismount(found.rootfs) or not _scaffold_only(found.rootfs):
        raise LazyshimError(f"{ANNOTATION}: root.path {found.rootfs} must be an empty directory "
                            "(or hold only the directories, symlinks and empty files an engine puts there)")
    scratch = store.containers / "oci" / state.parent.name / container_id
    if scratch.exists():
        shutil.rmtree(scratch)
    for sub in ("upper", "work"):
        (scratch / sub).mkdir(parents=True, mode=0o755)
    # The directory itself is the top lower layer: podman's scaffold (etc/mtab) stays visible.
    spec = api.layer_mount(store, image)
    sources = api.image_sources(store, image, found.image)
    # Recorded first: a cleanup after a failure below finds the FUSE layer to stop.
    (state / "mounted").write_text(json.dumps({"target": found.rootfs, "scratch": str(scratch)}))
    big = None
    if spec.data_lowers and agent_policy.foreign_reason(found.config) is None:
        from . import attach

        process = found.config.get("process") or {}
        big = bigmount.start(store.root, list(image.layers), sources, scratch,
                             background=attach.background_mode(found.config),
                             profile=attach.profile_flags(process.get("args") or [], process.get("cwd") or "/",
                                                          image.id))
    overlay.mount_overlay(spec.lowers + [Path(found.rootfs)], scratch / "upper", scratch / "work", Path(found.rootfs),
                          data_lowers=[*spec.data_lowers, big[0]] if big else spec.data_lowers, options=spec.options)
    return str(store.root), list(image.layers), sources, big[1] if big else 0, image.id


def _scratch(state: Path) -> Path | None:
    """The scratch dir of the image this bundle's overlay was mounted from (None: not ours)."""
    try:
        return Path(json.loads((state / "mounted").read_text())["scratch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _scaffold_only(path: str, limit: int = 64) -> bool:
    """Nothing but directories, symlinks and empty files (mount points an engine made)."""
    seen = 0
    for top, dirs, files in os.walk(path):
        seen += len(dirs) + len(files)
        if seen > limit:
            return False
        for name in files:
            st = os.lstat(os.path.join(top, name))
            if not (os.path.islink(os.path.join(top, name)) or (st.st_size == 0 and st.st_mode & 0o170000 == 0o100000)):
                return False
    return True


def _absolute_bind_sources(config: dict, bundle: str) -> None:
    """The delegate resolves relative bind sources against the bundle; ours is elsewhere."""
    for m in config.get("mounts") or []:
        if not isinstance(m, dict):
            continue
        src = m.get("source")
        opts = m.get("options") or []
        if isinstance(src, str) and src and not src.startswith("/") and (
                m.get("type") == "bind" or "bind" in opts or "rbind" in opts):
            m["source"] = os.path.join(bundle, src)


def cleanup(sdir: str) -> None:
    """Stop the supervisor, unmount what we mounted, forget the container."""
    from . import attach

    state = Path(sdir)
    mounted = state / "mounted"
    try:
        info = json.loads(mounted.read_text())
    except (OSError, ValueError):
        info = None
    if info:
        from . import overlay

        overlay.unmount(Path(info["target"]))
        from . import bigmount

        bigmount.stop(Path(info["scratch"]))  # once the overlay on it is gone
        shutil.rmtree(info["scratch"], ignore_errors=True)
    attach.stop_supervisor(state.name, sdir=state)
    try:
        state.parent.rmdir()  # the --root's directory, once its last container is gone
    except OSError:
        pass
