"""`lazyshim profile show|export|import|push|pull|rm`: the start-up profiles runs have learned.

A profile belongs to an image (manifest digest), its repository and a command; REF names the
image as `images` lists it (name, id or id prefix), or, if it is not pulled, a repository
(`registry/name[:tag]`: every profile of that repository).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .errors import LazyshimError


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="show, export, import or remove learned start-up profiles")
    verbs = p.add_subparsers(dest="profile_verb", metavar="VERB", required=True)
    s = verbs.add_parser("show", help="list profiles (of REF: with their files, first need first)")
    s.add_argument("--format", help="json, or a template such as '{{.Repository}} {{.Files}}'")
    s.add_argument("ref", nargs="?", metavar="REF")
    s.set_defaults(func=cmd_show)
    s = verbs.add_parser("export", help="write the profiles of REF as JSON (for `profile import` elsewhere)")
    s.add_argument("-o", "--output", help="write here (default: stdout)")
    s.add_argument("ref", metavar="REF")
    s.set_defaults(func=cmd_export)
    s = verbs.add_parser("import", help="add profiles a `profile export` wrote (FILE, or - for stdin)")
    s.add_argument("file", metavar="FILE")
    s.set_defaults(func=cmd_import)
    s = verbs.add_parser("push", help="publish the profiles of the pulled image REF beside it in its registry")
    s.add_argument("ref", metavar="REF")
    s.set_defaults(func=cmd_push)
    s = verbs.add_parser("pull", help="fetch the profiles published beside the pulled image REF")
    s.add_argument("ref", metavar="REF")
    s.set_defaults(func=cmd_pull)
    s = verbs.add_parser("rm", help="remove the profiles of REF (or --all)")
    s.add_argument("--all", action="store_true", help="every profile of the store")
    s.add_argument("ref", nargs="?", metavar="REF")
    s.set_defaults(func=cmd_rm)


def _selected(store, ref: str | None) -> list[tuple[Path, object]]:
    """The profiles REF names (all without REF), newest first."""
    from .store import profiles
    from .store.refs import resolve_image

    every = profiles.listing(store, _warn)
    if ref is None:
        return every
    try:
        rec = resolve_image(store, ref)
        return [(path, p) for path, p in every if p.image == rec.id]
    except LazyshimError:
        pass
    from .registry.reference import InvalidReference, parse_reference

    try:
        r = parse_reference(ref)
    except InvalidReference as e:
        raise LazyshimError(f"{ref!r} is neither a pulled image nor a repository: {e}") from None
    return [(path, p) for path, p in every if (p.registry, p.repository) == (r.registry, r.repository)
            and (r.digest is None or p.image == r.digest)]


def _warn(msg: str) -> None:
    print(f"lazyshim: {msg}", file=sys.stderr)


def _row(p, with_files: bool) -> dict:
    row = {
        "Repository": f"{p.registry}/{p.repository}", "Image": p.image, "ID": p.image.removeprefix("sha256:")[:12],
        "Command": " ".join(p.args), "Cwd": p.cwd, "Files": len(p.files), "Size": p.total_size,
        "Updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(p.updated)),
        "Chunks": sum(len(ks) for *_, ks in p.chunks),
    }
    if with_files:
        row["files"] = [{"path": "/" + name, "digest": digest, "size": size} for name, digest, size in p.files]
        row["chunks"] = [{"path": "/" + name, "digest": digest, "size": size, "chunks": list(ks)}
                         for name, digest, size, ks in p.chunks]
    return row


def cmd_show(args) -> int:
    from .api import open_store
    from .output import emit
    from .progress import human

    found = _selected(open_store(), args.ref)
    if args.ref is not None and not found:
        raise LazyshimError(f"no profile of {args.ref!r} (a supervised run of it records one)")
    rows = [_row(p, with_files=args.format == "json" or args.ref is not None) for _, p in found]
    if args.format or args.ref is None:
        if args.format != "json":
            for r in rows:
                r["size"] = human(r["Size"])
        emit(rows, args.format, [("REPOSITORY", "Repository"), ("ID", "ID"), ("COMMAND", "Command"),
                                 ("FILES", "Files"), ("SIZE", "size"), ("UPDATED", "Updated")])
        return 0
    for r in rows:  # one image: each profile's files, first need first (as `lazyshim record` lists them)
        print(f"# {r['Repository']} {r['ID']} {r['Command']!r} in {r['Cwd']}: {r['Files']} files, "
              f"{human(r['Size'])}, {r['Chunks']} chunks of big files, {r['Updated']}")
        for f in r["files"]:
            print(f["path"])
        for f in r["chunks"]:  # big files: the chunks touched, first touch first
            print(f"{f['path']} chunks {','.join(map(str, f['chunks']))}")
    return 0


def cmd_export(args) -> int:
    from .api import open_store
    from .store import profiles

    found = _selected(open_store(), args.ref)
    if not found:
        raise LazyshimError(f"no profile of {args.ref!r} to export")
    text = json.dumps([profiles.to_doc(p) for _, p in found], indent=1) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    print(f"exported {len(found)} profile(s)", file=sys.stderr)
    return 0


def cmd_import(args) -> int:
    from .api import open_store
    from .store import profiles

    if args.file == "-":
        data = sys.stdin.buffer.read(profiles.MAX_IMPORT_BYTES + 1)
    else:
        with open(args.file, "rb") as f:
            data = f.read(profiles.MAX_IMPORT_BYTES + 1)
    got = profiles.parse_many(data)  # all or nothing: one bad profile refuses the file
    store = open_store()
    for p in got:
        p.updated = time.time()  # new to this store: the bounds keep it as the newest
        profiles.save(store, p)
    print(f"imported {len(got)} profile(s)")
    return 0


def cmd_rm(args) -> int:
    from .api import open_store
    from .store import profiles

    if args.all == (args.ref is not None):
        raise LazyshimError("profile rm: give REF or --all")
    store = open_store()
    found = _selected(store, None if args.all else args.ref)
    if not found and not args.all:
        raise LazyshimError(f"no profile of {args.ref!r}")
    print(f"removed {profiles.remove(store, [path for path, _ in found])} profile(s)")
    return 0


def cmd_push(args) -> int:
    from .api import open_store
    from .profile_artifact import push

    print(push(open_store(), args.ref))
    return 0


def cmd_pull(args) -> int:
    from .api import open_store
    from .profile_artifact import pull

    print(f"pulled {pull(open_store(), args.ref)} profile(s)")
    return 0
