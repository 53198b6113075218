"""`lazyshim run --network bridge`: a veth into the container's own network namespace.

Like podman's default network: a host bridge (`lazyshim0`, 10.89.0.1/24) and, per
container, a veth pair whose inner end becomes `eth0` with the next free address and a
default route via the bridge; outbound traffic is masqueraded.  It is wired from an OCI
`createRuntime` hook, which runc calls once the namespaces exist and before the process
starts, with the container state (and so its pid) on stdin.  Uses pyroute2 (netlink).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

from shim.errors import LazyshimError

BRIDGE = "lazyshim0"
SUBNET = ipaddress.ip_network("10.89.0.0/24")
GATEWAY = next(SUBNET.hosts())


def _state_dir() -> Path:
    from .attach import runtime_dir

    d = runtime_dir() / "net"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    return d


def hook(container_id: str) -> dict:
    """The createRuntime hook entry for a container (added to its config)."""
    return {"path": sys.executable, "args": [sys.executable, "-m", "runtime.network", "setup", container_id]}


def _allocate(container_id: str) -> ipaddress.IPv4Address:
    d = _state_dir()
    with open(d / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for ip in list(SUBNET.hosts())[1:]:
            f = d / str(ip)
            if not f.exists():
                f.write_text(container_id)
                return ip
    raise LazyshimError(f"no free address left in {SUBNET}")


def release(container_id: str) -> None:
    """Free the container's address and its host-side veth (if the kernel has not already)."""
    d = _state_dir()
    for f in d.iterdir():
        if f.name != ".lock" and f.read_text() == container_id:
            f.unlink()
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=_host_ifname(container_id))
        if idx:
            ipr.link("del", index=idx[0])


def _host_ifname(container_id: str) -> str:
    return _ifname(container_id, "h")


def _peer_ifname(container_id: str) -> str:
    """The container's end before it is renamed eth0: never the host end's name (a suffix
    that is not a hex digit), or adding the pair fails with EEXIST."""
    return _ifname(container_id, "p")


def _ifname(container_id: str, end: str) -> str:
    return "lz" + hashlib.sha256(container_id.encode()).hexdigest()[:10] + end  # IFNAMSIZ: 15 chars


def _ensure_bridge(ipr) -> int:
    """The host bridge, made by whichever container gets there first: two containers that
    start at once may both try, and the loser finds the winner's bridge and address."""
    found = ipr.link_lookup(ifname=BRIDGE)
    if found:
        return found[0]
    _exists_ok(lambda: ipr.link("add", ifname=BRIDGE, kind="bridge"))
    idx = ipr.link_lookup(ifname=BRIDGE)[0]
    _exists_ok(lambda: ipr.addr("add", index=idx, address=str(GATEWAY), prefixlen=SUBNET.prefixlen))
    ipr.link("set", index=idx, state="up")
    _masquerade()
    return idx


def _exists_ok(op) -> None:
    from pyroute2 import NetlinkError

    try:
        op()
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise


def _masquerade() -> None:
    """Let containers reach out through the host, as podman's bridge does (best effort)."""
    try:
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        rule = ["POSTROUTING", "-s", str(SUBNET), "!", "-o", BRIDGE, "-j", "MASQUERADE"]
        if subprocess.run(["iptables", "-t", "nat", "-C", *rule], capture_output=True).returncode:
            subprocess.run(["iptables", "-t", "nat", "-A", *rule], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pass


def setup(container_id: str, pid: int) -> ipaddress.IPv4Address:
    from pyroute2 import IPRoute, NetNS

    ip = _allocate(container_id)
    host, peer = _host_ifname(container_id), _peer_ifname(container_id)
    try:
        with IPRoute() as ipr:
            bridge = _ensure_bridge(ipr)
            ipr.link("add", ifname=host, kind="veth", peer=peer)
            hidx = ipr.link_lookup(ifname=host)[0]
            ipr.link("set", index=hidx, master=bridge, state="up")
            pidx = ipr.link_lookup(ifname=peer)[0]
            with open(f"/proc/{pid}/ns/net") as nsf:
                ipr.link("set", index=pidx, net_ns_fd=nsf.fileno())
        ns = NetNS(f"/proc/{pid}/ns/net")
        try:
            lo = ns.link_lookup(ifname="lo")[0]
            ns.link("set", index=lo, state="up")
            idx = ns.link_lookup(ifname=peer)[0]
            ns.link("set", index=idx, ifname="eth0")
            ns.addr("add", index=idx, address=str(ip), prefixlen=SUBNET.prefixlen)
            ns.link("set", index=idx, state="up")
            ns.route("add", dst="0.0.0.0/0", gateway=str(GATEWAY))
        finally:
            ns.close()
    except BaseException:
        release(container_id)
        raise
    return ip


def main(argv: list[str]) -> int:
    """`python -m runtime.network setup ID` as runc's createRuntime hook (state on stdin)."""
    if len(argv) != 2 or argv[0] != "setup":
        print("usage: python -m runtime.network setup CONTAINER_ID", file=sys.stderr)
        return 2
    try:
        state = json.load(sys.stdin)
        setup(argv[1], int(state["pid"]))
    except (LazyshimError, OSError, ValueError, KeyError) as e:
        print(f"lazyshim network: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - netlink errors: one line for runc's error message
        print(f"lazyshim network: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
