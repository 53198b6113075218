"""Image verbs of the `lazyshim` command: pull, images, inspect, rmi, fetch, convert."""

from __future__ import annotations

import json
import sys
import time

from .errors import LazyshimError


def add_parsers(sub) -> None:
    p = sub.add_parser("pull", help="fetch manifest, config and TOCs; build placeholder trees")
    p.add_argument("image")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_pull)
    p = sub.add_parser("images", help="list pulled images")
    p.set_defaults(func=cmd_images)
    p = sub.add_parser("inspect", help="show a pulled image's record and layers")
    p.add_argument("image")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("rmi", help="forget a pulled image; delete layers nothing uses any more")
    p.add_argument("image", nargs="+")
    p.set_defaults(func=cmd_rmi)
    p = sub.add_parser("fetch", help="fill every file of a pulled image now")
    p.add_argument("image")
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
    from .pull import pull

    store = open_store()
    t0 = time.monotonic()
    rec = pull(args.image, store)
    dt = time.monotonic() - t0
    if args.quiet:
        print(rec.id)
        return 0
    print(f"image {rec.id}  ({rec.name}, {len(rec.layers)} layers, {dt:.2f}s)")
    for tree in layer_trees(store, rec):
        print(f"  lower {tree}")
    return 0


def cmd_images(args) -> int:
    from .api import open_store
    from .store.metadata import load_image, load_layer
    from .store.refs import load_refs

    store = open_store()
    rows = []
    for name, image_id in sorted(load_refs(store).items()):
        layers = size = 0
        try:
            rec = load_image(store.image_file(image_id).read_bytes())
            layers = len(rec.layers)
            for d in rec.layers:
                size += load_layer((store.layer_dir(d) / "meta.cbor").read_bytes()).blob_size
            shown = _human(size)
        except (OSError, LazyshimError):
            shown = "(damaged)"
        rows.append((name, image_id.removeprefix("sha256:")[:12], str(layers), shown))
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(_IMAGES_HEADER)]
    for row in [_IMAGES_HEADER, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


_IMAGES_HEADER = ("IMAGE", "ID", "LAYERS", "SIZE")


def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


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
    from .store.refs import resolve_image

    store = open_store()
    res = fill_image(store, resolve_image(store, args.image))
    print(f"filled {res.files_filled} files, {res.bytes_fetched} bytes in {res.seconds:.2f}s")
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
