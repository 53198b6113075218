"""`make demo`: the same small python image run lazily and after a full `podman pull`, over a WAN-like link.

Builds the demo image from this machine's python3 (integration.images; cached after the first run),
serves it from a real registry inside a private network namespace shaped to 100 Mbit/s and 20 ms
RTT (integration.netem), then times ``python3 -c 'print(...)'`` two ways, each from an empty cache:

- lazyshim: ``lazyshim pull`` (manifest, config, TOCs) + ``lazyshim run --rm`` (files filled on open);
- podman:   ``podman pull`` of the ordinary gzip image + ``podman run --rm``.
"""

from __future__ import annotations

import argparse
import sys

from integration.bench import Bench, BenchError, Workload
from integration.images import ImageBuildError
from integration.netem import Link, NetemError
from integration.registry import RegistryError

MESSAGE = "hello from a container whose image was not downloaded"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m integration.demo", description=__doc__.split("\n")[0])
    p.add_argument("--link", default="100mbit:20ms")
    args = p.parse_args(argv)
    wl = Workload("python", ["python3", "-c", f"print({MESSAGE!r})"], MESSAGE)
    try:
        link = Link.parse(args.link)
        print(f"demo: building/pushing the python image and shaping the link to {link} ...", flush=True)
        with Bench(link, ["python"], ["legacy", "esgz"]) as b:
            print(f"demo: link measured: RTT {b.rtt * 1000:.1f} ms, goodput {b.goodput * 8 / 1e6:.1f} Mbit/s")
            lazy = b.run_variant("lazyshim", wl, "esgz")
            print(f"lazyshim pull+run: output after {lazy.ttfo:.2f} s, exit {lazy.exit:.2f} s, "
                  f"{lazy.bytes / 1e6:.1f} MB from the registry")
            full = b.run_variant("podman", wl, "legacy")
            print(f"podman   pull+run: output after {full.ttfo:.2f} s, exit {full.exit:.2f} s, "
                  f"{full.bytes / 1e6:.1f} MB from the registry")
            print(f"speed-up to first output: {full.ttfo / lazy.ttfo:.1f}x; "
                  f"bytes moved: {lazy.bytes / max(full.bytes, 1):.0%} of a full pull")
    except (BenchError, NetemError, RegistryError, ImageBuildError, ValueError, OSError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
