"""`lazyshim snapshotter`: a containerd proxy snapshotter whose eStargz/zstd:chunked layers
are lazy trees of the lazyshim store (see `service` for how containerd is told so)."""

from __future__ import annotations

DEFAULT_ROOT = "/var/lib/lazyshim-snapshotter"


def add_parser(sub) -> None:
    p = sub.add_parser("snapshotter", help="serve a containerd proxy snapshotter that makes layers lazy",
                       description="Serve containerd's snapshots API on a unix socket.  containerd config: "
                       '[proxy_plugins.lazyshim] type = "snapshot" address = "SOCK".  Lazy layers live in '
                       "a lazyshim store of its own, ROOT/store unless --store names another.")
    p.add_argument("--address", required=True, metavar="SOCK", help="unix socket to listen on")
    p.add_argument("--root", default=DEFAULT_ROOT, metavar="DIR",
                   help=f"snapshot state and dirs (default {DEFAULT_ROOT})")
    p.add_argument("--store", default=None, metavar="DIR",
                   help="the lazyshim store for lazy layers (default ROOT/store; sharing the store of "
                   "`lazyshim pull` lets `lazyshim rmi` collect layers of unmounted snapshots)")
    p.set_defaults(func=cmd_snapshotter)


def cmd_snapshotter(args) -> int:
    from pathlib import Path

    from .server import serve

    root = Path(args.root)
    serve(Path(args.address), root, Path(args.store) if args.store else root / "store")
    return 0
