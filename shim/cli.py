"""Image verbs of the `lazyshim` command: pull, images, inspect, rmi, fetch, convert."""

from __future__ import annotations

import json
import sys
import time

from .errors import LazyshimError


def add_parsers(sub) -> None:
    p = sub.add_parser("pull", help="fetch manifest, config and TOCs; build placeholder trees")
    p.add_argument("image")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, only the image id")
    p.add_argument("--verbose", action="store_true", help="also print the layers' placeholder trees")
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("images", help="list pulled images")
    p.add_argument("--format", help="json, or a template such as '{{.Repository}} {{.ID}}'")
    p.add_argument("-q", "--quiet", action="store_true", help="image ids only")
    p.set_defaults(func=cmd_images)
    p = sub.add_parser("inspect", help="show a pulled image's record and layers")
    p.add_argument("--format", choices=("json",), default="json", help="always JSON (accepted for podman users)")
    p.add_argument("image")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("df", help="show how much the store holds: images, layers, fetched bytes")
    p.add_argument("--format", help="json, or a template such as '{{.Type}} {{.Size}}'")
    p.set_defaults(func=cmd_df)
    p = sub.add_parser("rmi", help="forget a pulled image; delete layers nothing uses any more")
    p.add_argument("image", nargs="+")
    p.set_defaults(func=cmd_rmi)
    p = sub.add_parser("fetch", help="fill every file of a pulled image now")
    p.add_argument("--blobs", action="store_true",
                   help="also keep each layer's whole compressed blob (for podman save, push, build FROM)")
    p.add_argument("image")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress")
    p.set_defaults(func=cmd_fetch)
    p = sub.add_parser("convert", help="convert an image to eStargz or zstd:chunked and push it",
                       description="SRC is a registry reference or oci:DIR[:TAG]; DST a registry reference.")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dst", metavar="DST")
    p.add_argument("--format", default="estargz", choices=("estargz", "zstd:chunked"))
    p.add_argument("--prioritize", metavar="FILE-LIST",
                   help="file listing absolute paths (one per line) to put first, before the landmark")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the manifest digest")
    p.set_defaults(func=cmd_convert)
    from .profile_cli import add_parser as add_profile

    add_profile(sub)
    from .snapshotter import add_parser as add_snapshotter

    add_snapshotter(sub)
    from .alsfs import add_parser as add_layer_store

    add_layer_store(sub)


def cmd_pull(args) -> int:
    from .api import layer_trees, open_store
    from .progress import Progress, pull_reporter
    from .pull import pull

    store = open_store()
    t0 = time.monotonic()
    progress = Progress(quiet=args.quiet)
    rec = pull(args.image, store, progress=pull_reporter(progress))
    progress.message(f"pulled {rec.name} ({len(rec.layers)} layers) in {time.monotonic() - t0:.2f}s")
    print(rec.id)
    if args.verbose:
        for tree in layer_trees(store, rec):
            print(f"  lower {tree}")
    return 0


def cmd_images(args) -> int:
    from .api import open_store
    from .output import emit
    from .store.layouts import load_meta
    from .store.metadata import load_image
    from .store.refs import load_refs

    store = open_store()
    rows = []
    for name, image_id in sorted(load_refs(store).items()):
        layers = size = 0
        damaged = False
        try:
            rec = load_image(store.image_file(image_id).read_bytes())
            layers = len(rec.layers)
            for d in rec.layers:
                size += load_meta(store, d).blob_size
        except (OSError, LazyshimError):
            damaged = True
        rows.append({"Repository": name, "Id": image_id, "ID": image_id.removeprefix("sha256:")[:12],
                     "Layers": layers, "Size": size, "Damaged": damaged,
                     "size": "(damaged)" if damaged else _human(size)})
    if args.quiet:
        for r in rows:
            print(r["ID"])
        return 0
    if args.format == "json":
        rows = [{k: v for k, v in r.items() if k not in ("ID", "size")} for r in rows]
    emit(rows, args.format, _IMAGES_COLUMNS)
    return 0


_IMAGES_COLUMNS = [("IMAGE", "Repository"), ("ID", "ID"), ("LAYERS", "Layers"), ("SIZE", "size")]


def _human(n: int) -> str:
    from .progress import human

    return human(n)


def cmd_inspect(args) -> int:
    from .api import open_store
    from .store.layouts import layout_of, load_meta
    from .store.refs import resolve_image

    store = open_store()
    rec = resolve_image(store, args.image)
    layout = layout_of(store)
    layers = []
    for d in rec.layers:
        meta = load_meta(store, d)
        regs = meta.table.data_files()
        filler = layout.filler(d, meta, _no_source)
        layers.append({
            "digest": d, "format": meta.format, "size": meta.blob_size, "entries": len(meta.toc.entries),
            "files": len(regs), "filled": sum(1 for i in regs if filler.is_filled(i)),
            "prioritized": meta.toc.prioritized, "tree": str(layout.lower_dir(d)), "layout": layout.name,
        })
    json.dump({"id": rec.id, "name": rec.name, "config": rec.config, "layers": layers}, sys.stdout, indent=2)
    print()
    return 0


def _no_source():
    raise LazyshimError("inspect fetches nothing")


def cmd_rmi(args) -> int:
    from .api import kept_profiles_note, open_store
    from .store.gc import collect, collect_data
    from .store.refs import load_refs, remove_ref, resolve_image
    from .store.sweep import release_unused_mounts

    store = open_store()
    for name in args.image:
        rec = resolve_image(store, name)
        with store.lock("gc"):
            refs = load_refs(store)
            key = _ref_key(name, refs)
            # By name: only that name goes; by id: every name of the image.
            drop = [key] if key is not None else [n for n, i in refs.items() if i == rec.id]
            for n in drop:
                remove_ref(store, n)
            if not any(i == rec.id for i in load_refs(store).values()):
                store.image_file(rec.id).unlink(missing_ok=True)
        print(rec.id)
    removed = collect(store)
    files, size = collect_data(store)
    if removed or files:
        print(f"deleted {len(removed)} unused layer(s), {files} data file(s) ({_human(size)})", file=sys.stderr)
    release_unused_mounts(store)
    note = kept_profiles_note(store)
    if note:
        print(note, file=sys.stderr)
    return 0


def cmd_df(args) -> int:
    """What the store holds, from its metadata (no tree walk): images, layers (blob bytes),
    file data fetched (and what identical files share), metadata in memory, containers."""
    from .api import open_store
    from .output import emit
    from .store.layouts import layout_of, load_meta
    from .store.refs import load_refs

    store = open_store()
    layout = layout_of(store)
    u = layout.usage()
    layers = [d for d in sorted(store.layers.iterdir()) if d.is_dir()] if store.layers.is_dir() else []
    blob = 0
    for d in layers:
        try:
            blob += load_meta(store, d.name.replace("-", ":", 1)).blob_size
        except (OSError, LazyshimError):
            continue
    containers = sum(1 for p in store.containers.iterdir() if p.is_dir() and p.name != "oci") \
        if store.containers.is_dir() else 0
    rows = [
        {"Type": "Images", "Total": len(set(load_refs(store).values())), "Size": blob},
        {"Type": "Layers", "Total": len(layers), "Size": blob},
        {"Type": "Fetched", "Total": u["filled"], "Size": u["data_bytes"], "Files": u["files"],
         "Shared": u["shared_bytes"]},
        {"Type": "Containers", "Total": containers, "Size": 0},
    ]
    if "meta_inodes" in u:
        rows.insert(3, {"Type": "Metadata", "Total": u["meta_inodes"], "Size": u["meta_bytes"]})
    if args.format:
        emit(rows, args.format, [("TYPE", "Type"), ("TOTAL", "Total"), ("SIZE", "Size")])
        return 0
    print(f"layout      {layout.name}")
    print(f"images      {rows[0]['Total']}, {len(layers)} layers, {_human(blob)} compressed")
    print(f"files       {u['filled']} of {u['files']} filled")
    print(f"data        {_human(u['data_bytes'])} on disk" + (
        f" (+{_human(u['shared_bytes'])} more that identical files share)" if u["shared_bytes"] else ""))
    if "meta_inodes" in u:
        print(f"metadata    {u['meta_inodes']} inodes in memory (about {_human(u['meta_inodes'] * 1024)}), "
              f"{_human(u['meta_bytes'])} of file contents")
    print(f"containers  {containers}")
    return 0


def _ref_key(name: str, refs: dict[str, str]) -> str | None:
    if name in refs:
        return name
    from .registry.reference import parse_reference

    try:
        norm = str(parse_reference(name))
    except ValueError:
        return None
    return norm if norm in refs else None


def cmd_fetch(args) -> int:
    from .api import fill_image, open_store
    from .progress import Progress, files_bar
    from .store.refs import resolve_image

    store = open_store()
    rec = resolve_image(store, args.image)
    progress = Progress(quiet=args.quiet)
    t0 = time.monotonic()
    files = fetched = 0
    for n, digest in enumerate(rec.layers, 1):  # one bar per layer, rewritten as its files arrive
        label = f"layer {n}/{len(rec.layers)} {digest[:19]}"
        shown = [files_bar(label, 0, 0, 0)]

        def show(done: int, total: int, nbytes: int, label=label, shown=shown) -> None:
            shown[0] = files_bar(label, done, total, nbytes)
            progress.update(shown[0])

        res = fill_image(store, [digest], progress=show)
        progress.finish(shown[0])
        files, fetched = files + res.files_filled, fetched + res.bytes_fetched
    if not args.quiet:
        print(f"filled {files} files, {fetched} bytes in {time.monotonic() - t0:.2f}s")
    if getattr(args, "blobs", False):
        _fetch_blobs(store, rec)
    return 0


def _fetch_blobs(store, rec) -> None:
    from .sources import new_client
    from .store.blobs import fetch_blob

    with new_client(rec.registry) as client:
        n = sum(fetch_blob(store, client, rec.repository, d) for d in rec.layers)
    print(f"stored {len(rec.layers)} layer blobs, {n} bytes downloaded")


def cmd_convert(args) -> int:
    from .convert import convert, read_prioritize_file

    prio = read_prioritize_file(args.prioritize) if args.prioritize else None
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    res = convert(args.src, args.dst, args.format, prio, log=log)
    if args.quiet:
        print(res.digest)
        return 0
    before = sum(s for s, _, _ in res.layers)
    after = sum(n for _, _, n in res.layers)
    print(f"{res.reference}@{res.digest}  ({len(res.layers)} layers, {_human(before)} -> {_human(after)}, "
          f"{args.format}, {res.seconds:.1f}s)")
    return 0
