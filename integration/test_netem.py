"""The benchmark's emulated link does what it says, and leaves nothing behind."""

from __future__ import annotations

import subprocess

from integration.netem import Link, our_namespaces, shaped_netns


def _nfqueue_rules(ns_prefix: list[str]) -> str:
    return subprocess.run([*ns_prefix, "iptables", "-w", "-S", "INPUT"], capture_output=True, text=True).stdout


def test_link_parse() -> None:
    assert Link.parse("100mbit:20ms") == Link(100_000_000, 0.02)
    assert Link.parse("1.5gbit:1s") == Link(1_500_000_000, 1.0)


def test_shaped_namespace_meets_target_and_cleans_up() -> None:
    before = our_namespaces()
    link = Link.parse("100mbit:20ms")
    with shaped_netns(link) as ns:
        assert ns.name in our_namespaces()
        assert "NFQUEUE" in _nfqueue_rules(ns.prefix)
        rtt, goodput = ns.verify(rtt_tolerance=0.3, goodput_range=(0.7, 1.1))
        assert abs(rtt - 0.020) <= 0.3 * 0.020, rtt
        assert 70e6 <= goodput * 8 <= 110e6, goodput
        assert ns.delayer_alive()
        ns.unshape()
        assert "NFQUEUE" not in _nfqueue_rules(ns.prefix)
        assert not ns.delayer_alive()
        assert "htb" not in subprocess.run(["tc", "-n", ns.name, "qdisc", "show", "dev", "lo"],
                                           capture_output=True, text=True).stdout
        path = ns.path
    assert not path.exists(), "netns left behind"
    assert our_namespaces() == before
    assert "NFQUEUE" not in _nfqueue_rules([]), "a rule leaked into the host's INPUT chain"
