"""`lazyshim`: one command for image management and the runc-compatible runtime.

A runc command line (`create`, `start`, `state`, `kill`, `delete`, `exec`, ..., with runc's
global flags) goes to `runtime.oci`, which imports almost nothing: podman calls us several
times per container and `state` must cost little more than `runc state`.  lazyshim's own
verbs (pull, images, inspect, rmi, fetch, and `run IMAGE` - see `oci.wants_oci` for how
`run` is told apart from runc's `run`) get an argparse CLI.
"""

from __future__ import annotations

import sys

EPILOG = """\
runc commands (create, start, run -b BUNDLE ID, state, kill, delete, exec, ps, list, pause,
resume, update, events, features, spec, checkpoint, restore, --version) are handled as runc
handles them, by runc or crun; bundles whose rootfs is a lazyshim overlay (or that carry the
annotation run.lazyshim.image=REF) get their files filled on open.  `ps` without a container id
and `exec` on a container of `lazyshim run` are lazyshim's own; with an id (or a runc global flag
before the verb) they are runc's.
"""


def main(argv: list[str] | None = None) -> int:
    from shim.trace import mark

    mark("runtime", "main")
    argv = sys.argv[1:] if argv is None else list(argv)
    from . import oci

    if oci.wants_oci(argv):
        return oci.main(argv)
    return image_main(argv)


def _parser(verb: str | None = None):
    """The CLI; for `run` (the verb whose start-up is timed) only its own subcommand, so
    that `lazyshim run` does not import every other verb's modules first."""
    import argparse

    p = argparse.ArgumentParser(prog="lazyshim", description="Start containers before their image is downloaded.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", metavar="COMMAND")
    if verb == "run":
        from . import run

        run.add_parser(sub)
        return p
    from shim import cli as image_cli

    image_cli.add_parsers(sub)
    from . import completion, ctl, info, mount, record, run, stale, stats

    run.add_parser(sub)
    ctl.add_parsers(sub)
    stale.add_parser(sub)
    info.add_parser(sub)
    completion.add_parser(sub)
    record.add_parser(sub)
    stats.add_parser(sub)
    mount.add_parsers(sub)
    sub.add_parser("help", help="show this help")
    return p


def image_main(argv: list[str]) -> int:
    p = _parser(argv[0] if argv else None)
    args = p.parse_args(argv)
    if not getattr(args, "func", None):
        p.print_help(sys.stdout if args.verb == "help" else sys.stderr)
        return 0 if args.verb == "help" else 2
    from .rootless import maybe_reexec

    try:
        maybe_reexec(args.verb, argv)
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        print(f"lazyshim: {e}", file=sys.stderr)
        return 1
    return _guarded(_swept, args)


def _swept(args) -> int:
    """Every verb that uses the store first sweeps what killed lazyshims left (gc does it
    itself, and reports it)."""
    from shim.trace import mark

    mark("runtime", "parsed")
    if args.verb != "gc":
        from .stale import sweep_before

        sweep_before(args.verb)
    mark("runtime", "swept")
    return args.func(args)


def _guarded(func, args) -> int:
    """Run a verb; expected failures become one line on stderr, never a traceback."""
    from shim.errors import LazyshimError
    from shim.formats.toc import FormatError
    from shim.registry.errors import RegistryError  # the HTTP client itself only when a verb needs it

    code = getattr(args, "error_code", 1)
    try:
        return func(args) or 0
    except (LazyshimError, FormatError, RegistryError, ValueError) as e:
        print(f"lazyshim: {e}", file=sys.stderr)
        return code
    except OSError as e:
        print(f"lazyshim: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lazyshim inspect | head`: the reader left, nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
