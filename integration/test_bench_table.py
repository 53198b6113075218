"""The benchmark table: every variant of one run in one table, with ratios to the floor and the peer."""

from __future__ import annotations

from types import SimpleNamespace

from integration.bench import Result, Sample, table
from integration.netem import Link


def _result(variant: str, exit_s: float, nbytes: int = 10_000_000) -> Result:
    return Result("py", variant, [Sample(exit_s - 0.1, exit_s, nbytes, 0, True, pull=exit_s / 2)])


def test_ratios_to_floor_and_to_the_matching_stargz_variant() -> None:
    link = Link.parse("100mbit:20ms")
    bench = SimpleNamespace(link=link, rtt=0.02, goodput=12e6, floor=lambda n: 1.0)
    rows = [_result("podman", 8.0), _result("stargz", 4.0), _result("stargz-opt", 2.0),
            _result("lazyshim", 2.0), _result("lazyshim-opt", 3.0), Result("py", "lazyshim-zstd", error="boom|x")]
    lines = table(rows, bench).splitlines()  # type: ignore[arg-type]
    cells = {ln.split(" | ")[1]: ln.strip("|").split(" | ") for ln in lines if ln.startswith("| py |")}
    assert cells["lazyshim"][-2:] == ["2.00", "0.50 "]  # vs floor 1.0 s, vs stargz 4.0 s
    assert cells["lazyshim-opt"][-2:] == ["3.00", "1.50 "]  # -opt variants are compared with stargz-opt
    assert cells["podman"][6] == "1.0×" and cells["lazyshim"][6] == "4.0×"
    assert cells["floor"][-2:] == ["1.00", "0.25 "]
    assert "failed: …boom/x" in cells["lazyshim-zstd"][2]
