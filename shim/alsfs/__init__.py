"""`lazyshim layer-store`: an additional layer store for podman and CRI-O that pulls on lookup.

containers/storage (`additionallayerstores = ["MOUNTPOINT:ref"]` in storage.conf) looks up
`MOUNTPOINT/<base64 ref>/<layer digest>/{diff,info,blob}` before it downloads a layer.  This
serves that namespace from a small FUSE file system (`fs`), so a plain `podman pull` of an
eStargz or zstd:chunked image is lazy without a `lazyshim pull` first: the layers it looks
up are pulled lazily into the store (`layers`) and `diff` leads to their trees.
"""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("layer-store", help="serve podman's additional layer store, pulling layers on lookup",
                       description="Mount a FUSE file system at MOUNTPOINT for containers/storage's "
                       'additionallayerstores = ["MOUNTPOINT:ref"]; eStargz/zstd:chunked layers are pulled '
                       "lazily into the lazyshim store when podman or CRI-O looks them up.  Runs until "
                       "SIGTERM or SIGINT, then unmounts.")
    p.add_argument("--mountpoint", required=True, metavar="DIR", help="an empty directory to mount on")
    p.set_defaults(func=cmd_layer_store)


def cmd_layer_store(args) -> int:
    from pathlib import Path

    from .server import serve

    serve(Path(args.mountpoint))
    return 0
