"""`lazyshim`: one command for image management and the runc-compatible runtime.

Image verbs (pull, images, inspect, rmi, fetch) live in `shim.cli`; runtime verbs in
`runtime`.  Imports stay lazy: podman calls us several times per container and `state`
must cost little more than `runc state`.
"""

from __future__ import annotations

import argparse
import sys

IMAGE_VERBS = ("pull", "images", "inspect", "rmi", "fetch")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lazyshim", description="Start containers before their image is downloaded.")
    p.add_argument("--version", action="version", version="lazyshim 0.1.0")
    sub = p.add_subparsers(dest="verb", metavar="COMMAND")
    from shim import cli as image_cli

    image_cli.add_parsers(sub)
    from . import run, stats

    run.add_parser(sub)
    stats.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = _parser()
    args = p.parse_args(argv)
    if not getattr(args, "func", None):
        p.print_help(sys.stderr)
        return 2
    from .rootless import maybe_reexec

    try:
        maybe_reexec(args.verb, argv)
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        print(f"lazyshim: {e}", file=sys.stderr)
        return 1
    return _guarded(args.func, args)


def _guarded(func, args) -> int:
    """Run a verb; expected failures become one line on stderr, never a traceback."""
    from shim.errors import LazyshimError
    from shim.formats.toc import FormatError
    from shim.registry.client import RegistryError

    try:
        return func(args) or 0
    except (LazyshimError, FormatError, RegistryError, ValueError) as e:
        print(f"lazyshim: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"lazyshim: {e.strerror or e}{': ' + str(e.filename) if e.filename else ''}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `lazyshim inspect | head`: the reader left, nothing to report
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
