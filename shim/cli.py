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
    from .snapshotter import add_parser as add_snapshotter

    add_snapshotter(sub)


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
    from .store.metadata import load_image, load_layer
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
                size += load_layer((store.layer_dir(d) / "meta.cbor").read_bytes()).blob_size
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
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def cmd_df(args) -> int:
    """Sizes from the metadata (no tree walk): blob bytes, and the bytes of filled files."""
    from .api import open_store
    from .output import emit
    from .store.metadata import load_layer
    from .store.refs import load_refs

    store = open_store()
    images = set(load_refs(store).values())
    layers = blob = fetched = files = filled = 0
    for d in sorted(store.layers.iterdir()) if store.layers.is_dir() else []:
        try:
            meta = load_layer((d / "meta.cbor").read_bytes())
            fmap = (d / "filled").read_bytes()
        except (OSError, LazyshimError):
            continue
        layers += 1
        blob += meta.blob_size
        for i, e in enumerate(meta.toc.entries):
            if e.type == "reg" and e.size:
                files += 1
                if i < len(fmap) and fmap[i]:
                    filled += 1
                    fetched += e.size
    containers = sum(1 for p in store.containers.iterdir() if p.is_dir() and p.name != "oci") \
        if store.containers.is_dir() else 0
    rows = [
        {"Type": "Images", "Total": len(images), "Size": blob, "Files": files, "Filled": filled},
        {"Type": "Layers", "Total": layers, "Size": blob, "Files": files, "Filled": filled},
        {"Type": "Fetched", "Total": filled, "Size": fetched, "Files": files, "Filled": filled},
        {"Type": "Containers", "Total": containers, "Size": 0, "Files": 0, "Filled": 0},
    ]
    if args.format != "json":
        for r in rows:
            r["size"] = _human(r["Size"]) if r["Type"] != "Containers" else "-"
    emit(rows, args.format, [("TYPE", "Type"), ("TOTAL", "Total"), ("SIZE", "size")])
    return 0


def cmd_inspect(args) -> int:
    from .api import open_store
    from .store.metadata import load_layer
    from .store.refs import resolve_image

    store = open_store()
    rec = resolve_image(store, args.image)
    layers = []
    for d in rec.layers:
        meta = load_layer((store.layer_dir(d) / "meta.cbor").read_bytes())
        filled = (store.layer_dir(d) / "filled").read_bytes()
        regs = [i for i, e in enumerate(meta.toc.entries) if e.type == "reg" and e.size]
        layers.append({
            "digest": d, "format": meta.format, "size": meta.blob_size, "entries": len(meta.toc.entries),
            "files": len(regs), "filled": sum(1 for i in regs if filled[i]),
            "prioritized": meta.toc.prioritized, "tree": str(store.layer_dir(d) / "tree"),
        })
    json.dump({"id": rec.id, "name": rec.name, "config": rec.config, "layers": layers}, sys.stdout, indent=2)
    print()
    return 0


def cmd_rmi(args) -> int:
    from .api import open_store
    from .store.gc import collect
    from .store.refs import load_refs, remove_ref, resolve_image

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
    if removed:
        print(f"deleted {len(removed)} unused layer(s)", file=sys.stderr)
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
    return 0


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
