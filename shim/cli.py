"""Image verbs of the `lazyshim` command: pull, images, inspect, rmi, fetch."""

from __future__ import annotations

import json
import sys
import time


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
    p = sub.add_parser("rmi", help="forget a pulled image")
    p.add_argument("image")
    p.set_defaults(func=cmd_rmi)
    p = sub.add_parser("fetch", help="fill every file of a pulled image now")
    p.add_argument("image")
    p.set_defaults(func=cmd_fetch)


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
    from .store.refs import load_refs

    store = open_store()
    for name, image_id in sorted(load_refs(store).items()):
        print(f"{name}\t{image_id}")
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
    from .store.refs import remove_ref, resolve_image

    store = open_store()
    rec = resolve_image(store, args.image)
    remove_ref(store, rec.name)
    print(rec.id)
    return 0


def cmd_fetch(args) -> int:
    from .api import open_store
    from .lazyroot import LazyRoot
    from .store.refs import resolve_image

    store = open_store()
    rec = resolve_image(store, args.image)
    root = LazyRoot(store, rec.layers)
    t0 = time.monotonic()
    errors: list[str] = []
    for filler, indices in root.prefetch_plan(everything=True):
        filler.prefetch(indices, lambda: None, max_request=8 << 20)
        errors += filler.errors
    if errors or not root.complete():
        from .errors import LazyshimError

        first = errors[0] if errors else "files remain unfilled"
        raise LazyshimError(f"{args.image}: {len(errors)} files could not be fetched; first: {first}")
    st = root.stats()
    print(f"filled {st['files_filled']} files, {st['bytes_fetched']} bytes in {time.monotonic() - t0:.2f}s")
    return 0
