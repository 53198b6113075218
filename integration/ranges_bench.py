"""Benchmark: how many range requests in flight pay off on a link (the fills' connection pool).

``python -m integration.ranges_bench --link 100mbit:20ms --piece 1m --parallel 1,2,3,4,8``

A random blob is pushed to a registry inside a shaped network namespace (integration.netem);
then, per degree of parallelism k, the shared client (one keep-alive pool, as the supervisor uses)
fetches the same amount in pieces with k requests in flight, and the goodput is printed next to
the link's rate.  Several runs per k, median; the machine's load moves absolute figures, so only
the ratios between k inside one run count.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from integration.netem import Link, NetemError, ShapedNetns, in_netns
from integration.registry import Registry, RegistryError

REPO = "bench/ranges"


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20}
    return int(text[:-1]) * units[text[-1].lower()] if text[-1].lower() in units else int(text)


def fetch_all(client, digest: str, total: int, piece: int, parallel: int) -> float:
    """Seconds to fetch [0, total) in `piece`-sized ranges, `parallel` at once."""
    starts = range(0, total, piece)
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for data in pool.map(lambda s: client.get_range(REPO, digest, s, min(s + piece, total)), starts):
            assert data
    return time.monotonic() - t0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m integration.ranges_bench", description=__doc__.split("\n")[0])
    p.add_argument("--link", default="100mbit:20ms")
    p.add_argument("--total", default="24m", help="bytes fetched per measurement")
    p.add_argument("--piece", default="1m", help="bytes per range request")
    p.add_argument("--parallel", default="1,2,3,4,8")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    total, piece = _size(args.total), _size(args.piece)
    degrees = [int(x) for x in args.parallel.split(",")]
    blob = os.urandom(total)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    try:
        with ShapedNetns(Link.parse(args.link)) as ns, \
                Registry(prefix_cmd=ns.prefix, call_in=lambda f: in_netns(ns.path, f)) as registry:
            from shim.registry.client import RegistryClient

            client: RegistryClient = in_netns(ns.path, lambda: RegistryClient(registry.host))
            in_netns(ns.path, lambda: client.push_blob(REPO, digest, blob))  # before shaping: not measured
            ns.shape()
            rtt, goodput = ns.verify()

            def measure() -> list[str]:
                lines = [f"link {args.link}: RTT {rtt * 1000:.1f} ms, goodput {goodput * 8 / 1e6:.1f} Mbit/s; "
                         f"{total >> 20} MiB in {piece >> 10} KiB ranges, median of {args.runs}", "",
                         "| in flight | seconds | Mbit/s | ÷ link goodput |", "|---|---|---|---|"]
                for k in degrees:
                    fetch_all(client, digest, min(total, 2 * k * piece), piece, k)  # k warm connections
                    secs = statistics.median(fetch_all(client, digest, total, piece, k) for _ in range(args.runs))
                    rate = total / secs
                    lines.append(f"| {k} | {secs:.2f} | {rate * 8 / 1e6:.1f} | {rate / goodput:.2f} |")
                client.close()
                return lines

            print("\n".join(in_netns(ns.path, measure)))
    except (NetemError, RegistryError) as exc:
        print(f"ranges_bench: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
