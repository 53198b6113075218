"""`make demo`: a model server's image (>100 MB) started lazily, by the peer, and after a full pull.

Builds the demo image from this machine's python3 and a generated model (integration.demo_image;
cached after the first run), serves it from a real registry inside a private network namespace
shaped to 100 Mbit/s and 20 ms RTT (integration.netem), then times the server's start-up check,
each way from empty caches:

- lazyshim: ``lazyshim pull`` (manifest, config, TOCs) + ``lazyshim run --rm`` (files filled on open);
- stargz:   podman pull + run of the same eStargz image with stargz-snapshotter's stargz-store as
            podman's additional layer store (if built: ``make peers``, which ``make demo`` runs);
- podman:   ``podman pull`` of the ordinary gzip image + ``podman run --rm``.

It also runs lazyshim once without background fetch, to say how many bytes the workload needed.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from integration import demo_image
from integration.bench import Bench, BenchError, Sample, Workload
from integration.images import ImageBuildError, cached_layer_sizes
from integration.netem import Link, NetemError
from integration.peers import stargz_store_binary
from integration.registry import RegistryError

WORKLOAD = Workload(demo_image.NAME, demo_image.CMD, demo_image.READY)
# (bench variant, image tag, label)
WAYS = (("lazyshim", "esgz", "lazyshim pull+run"), ("stargz", "esgz", "stargz    pull+run"),
        ("podman", "legacy", "podman   pull+run"))


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _versus(ratio: float, other: str) -> str:
    """'2.6x sooner than X' or '1.5x later than X' (ratio = their time / lazyshim's)."""
    return f"{ratio:.1f}x sooner than {other}" if ratio >= 1 else f"{1 / ratio:.1f}x later than {other}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m integration.demo", description=__doc__.split("\n")[0])
    p.add_argument("--link", default="100mbit:20ms")
    p.add_argument("--runs", type=int, default=1, help="runs per way (fresh caches each); medians are compared")
    args = p.parse_args(argv)
    ways = [w for w in WAYS if w[0] != "stargz" or stargz_store_binary() is not None]
    try:
        link = Link.parse(args.link)
        demo_image.register()
        print(f"demo: building/pushing the {demo_image.NAME} image and shaping the link to {link} ...", flush=True)
        with Bench(link, [demo_image.NAME], ["legacy", "esgz"]) as b:
            shape = demo_image.shape(demo_image.demo_spec())
            gz, esgz = (sum(cached_layer_sizes(demo_image.NAME, t)) for t in ("legacy", "esgz"))
            print(f"demo: image {demo_image.NAME}: python3.11 + its stdlib from this machine "
                  f"({shape.runtime_files} files, {_mb(shape.runtime_bytes)}) + a model server with a generated "
                  f"fp16 model ({shape.model_files} files, {_mb(shape.model_bytes)}); "
                  f"{_mb(gz)} as gzip, {_mb(esgz)} as eStargz")
            print(f"demo: workload: {' '.join(demo_image.CMD)} (imports http.server and logging, reads the "
                  "model's index, stats its shards; the weights are read on the first request)")
            print(f"demo: link measured: RTT {b.rtt * 1000:.1f} ms, goodput {b.goodput * 8 / 1e6:.1f} Mbit/s")
            if len(ways) < len(WAYS):
                print("demo: stargz-snapshotter not built (`make peers`): comparing with podman only")
            med: dict[str, Sample] = {}
            for variant, tag, label in ways:
                samples = []
                for i in range(args.runs):
                    s = b.run_variant(variant, WORKLOAD, tag)
                    samples.append(s)
                    run = f" (run {i + 1})" if args.runs > 1 else ""
                    print(f"{label}{run}: output after {s.ttfo:.2f} s, exit {s.exit:.2f} s "
                          f"(pull step {s.pull:.2f} s), {_mb(s.bytes)} from the registry", flush=True)
                med[variant] = Sample(statistics.median(x.ttfo for x in samples),
                                      statistics.median(x.exit for x in samples),
                                      int(statistics.median(x.bytes for x in samples)), 0, True)
            need = b.run_variant("lazyshim-nobg", WORKLOAD, "esgz")
            lazy, full = med["lazyshim"], med["podman"]
            print(f"bytes the workload needed: {_mb(need.bytes)} of {_mb(esgz)} (lazyshim without background "
                  f"fetch: output after {need.ttfo:.2f} s)")
            median = "medians: " if args.runs > 1 else ""
            versus = [_versus(full.ttfo / lazy.ttfo, "podman pull+run")]
            if "stargz" in med:
                versus.append(_versus(med["stargz"].ttfo / lazy.ttfo, "stargz-snapshotter"))
            print(f"{median}lazyshim reached first output {' and '.join(versus)}; it moved {_mb(lazy.bytes)} "
                  f"by exit (background fetch included), podman {_mb(full.bytes)}")
    except (BenchError, NetemError, RegistryError, ImageBuildError, ValueError, OSError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
