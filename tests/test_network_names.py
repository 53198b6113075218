"""The bridge network's interface names: the two ends of a pair never share a name."""

from __future__ import annotations

from runtime import network


def test_the_veth_ends_have_distinct_names_that_fit_ifnamsiz() -> None:
    # One id in 16 ended in the hex digit the peer's name once replaced it with: EEXIST at run.
    for n in range(2000):
        cid = f"t{n}"
        host, peer = network._host_ifname(cid), network._peer_ifname(cid)
        assert host != peer and len(host) <= 15 and len(peer) <= 15, cid
