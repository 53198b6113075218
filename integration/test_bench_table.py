"""The benchmark harness without a link: the table (every variant of a run, ratios to the floor and the
peer) and the check that the peer really served its layers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from integration import images
from integration.bench import Bench, BenchError, Result, Sample, table
from integration.netem import Link
from integration.registry import AccessLogEntry


def _result(variant: str, exit_s: float, nbytes: int = 10_000_000) -> Result:
    return Result("py", variant, [Sample(exit_s - 0.1, exit_s, nbytes, 0, True, pull=exit_s / 2)])


def test_ratios_to_floor_and_to_the_matching_stargz_variant() -> None:
    link = Link.parse("100mbit:20ms")
    bench = SimpleNamespace(link=link, rtt=0.02, goodput=12e6, floor=lambda n, warm=0.0: 1.0 + warm)
    rows = [_result("podman", 8.0), _result("stargz", 4.0), _result("stargz-opt", 2.0),
            _result("lazyshim", 2.0), _result("lazyshim-opt", 3.0), Result("py", "lazyshim-zstd", error="boom|x")]
    lines = table(rows, bench).splitlines()  # type: ignore[arg-type]
    cells = {ln.split(" | ")[1]: ln.strip("|").split(" | ") for ln in lines if ln.startswith("| py |")}
    # vs floor 1.0 s, vs stargz 4.0 s; run steps (exit - pull = exit / 2): 1.0 s vs 2.0 s
    assert cells["lazyshim"][-3:] == ["2.00", "0.50", "0.50 "]
    assert cells["lazyshim-opt"][-3:] == ["3.00", "1.50", "1.50 "]  # -opt variants are compared with stargz-opt
    assert cells["podman"][6] == "1.0×" and cells["lazyshim"][6] == "4.0×"
    assert cells["floor"][-3:] == ["1.00", "0.25", ""]
    assert "failed: …boom/x" in cells["lazyshim-zstd"][2]


def test_the_floor_includes_the_warm_run_when_it_was_measured() -> None:
    link = Link.parse("100mbit:20ms")
    bench = SimpleNamespace(link=link, rtt=0.02, goodput=12e6, floor=lambda n, warm=0.0: 1.0 + warm)
    rows = [_result("lazyshim", 3.0), _result("lazyshim-prof", 2.4), _result("lazyshim-warm", 1.0)]
    cells = {ln.split(" | ")[1]: ln.strip("|").split(" | ") for ln in table(rows, bench).splitlines()  # type: ignore[arg-type]
             if ln.startswith("| py |")}
    assert cells["lazyshim-prof"][-3] == "1.20"  # ÷ floor: 2.4 s against 1.0 s + a warm run of 1.0 s


def test_a_micro_only_run_has_an_empty_table_not_a_crash() -> None:
    """`--runs 0 --micro`: variants without samples are left out of the table."""
    bench = SimpleNamespace(link=Link.parse("1gbit:2ms"), rtt=0.002, goodput=120e6, floor=lambda n: 1.0)
    lines = table([Result("py", "lazyshim")], bench).splitlines()  # type: ignore[arg-type]
    assert not [ln for ln in lines if ln.startswith("| py |")]


def test_a_silent_fallback_to_a_full_pull_fails_the_stargz_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = "/v2/py/blobs/sha256:" + "a" * 64
    log = [AccessLogEntry("GET", "/v2/py/blobs/sha256:" + "c" * 64, 200, 554),  # the config
           AccessLogEntry("GET", layer, 206, 4096)]  # ranges: what stargz-store reads
    bench = Bench.__new__(Bench)
    bench.optimize = {}
    bench.registry = SimpleNamespace(access_log=lambda: log)  # type: ignore[assignment]
    monkeypatch.setattr(images, "cached_layer_sizes", lambda name, tag, opt=None: [10_000_000])
    bench._check_layer_store_used("stargz", "py", "esgz")
    log.append(AccessLogEntry("GET", layer, 200, 10_000_000))  # podman pulled the layer itself
    with pytest.raises(BenchError, match="did not serve"):
        bench._check_layer_store_used("stargz", "py", "esgz")
