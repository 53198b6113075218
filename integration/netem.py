"""Link emulation for benchmarks: a private network namespace whose loopback behaves like a WAN link.

Why this way: the kernel here has no ``sch_netem``, so rate and delay come from two separate pieces
(see /work/shared/MACHINE.md):

- rate: an HTB qdisc on the namespace's ``lo``, set up with pyroute2 (``NetNS.tc``);
- delay: ``iptables -A INPUT -j NFQUEUE`` inside the namespace and a small user-space delayer (this
  module run as ``python -m integration.netem --delayer ...``, raw ``NETLINK_NETFILTER``: pyroute2
  0.9.7 has no NFQUEUE support) that holds every packet for RTT/2 and then accepts it. On loopback
  every packet crosses INPUT exactly once, so both directions are delayed and a round trip costs
  one RTT. (Queueing on OUTPUT instead throttles TCP to a trickle: TSQ waits for the skb to be freed.)

Only loopback addresses inside namespaces created here carry traffic. Processes join the namespace
with ``nsenter --net=/run/netns/NAME`` (``ip netns exec`` remounts /sys and hides the cgroup mounts,
which breaks runc/podman). Python code of the harness reaches it with :func:`in_netns`, which runs a
function in a thread that has ``setns()``-ed into the namespace (a socket keeps the namespace it was
created in).

Everything is undone on exit: the iptables rule, the delayer, the qdisc and the namespace itself
(context manager, plus ``atexit`` for the paths a ``with`` block cannot see).
"""

from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import ctypes
import os
import re
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

NETNS_DIR = Path("/run/netns")
NAME_PREFIX = "lzb-"
QUEUE_NUM = 0  # NFQUEUE instances are per network namespace, so a fixed number is fine
CLONE_NEWNET = 0x40000000

T = TypeVar("T")


class NetemError(RuntimeError):
    """Setting up, measuring or tearing down the emulated link failed."""


# ---------------------------------------------------------------------------------------------
# Link description
# ---------------------------------------------------------------------------------------------

_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


@dataclass(frozen=True)
class Link:
    """A link as ``RATE:RTT``, e.g. ``100mbit:20ms``: rate in bit/s and round-trip time in seconds."""

    rate_bps: int
    rtt_s: float

    @classmethod
    def parse(cls, text: str) -> Link:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)\s*:\s*(\d+(?:\.\d+)?)\s*(ms|s)\s*", text.lower())
        if not m:
            raise ValueError(f"link {text!r}: expected RATE:RTT like 100mbit:20ms")
        rate = int(float(m.group(1)) * _UNITS[m.group(2)])
        rtt = float(m.group(3)) / (1000 if m.group(4) == "ms" else 1)
        if rate <= 0:
            raise ValueError(f"link {text!r}: rate must be positive")
        return cls(rate, rtt)

    def __str__(self) -> str:
        return f"{self.rate_bps / 1e6:g}mbit:{self.rtt_s * 1000:g}ms"

    @property
    def bytes_per_s(self) -> float:
        return self.rate_bps / 8


# ---------------------------------------------------------------------------------------------
# Running code and processes inside a namespace
# ---------------------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(netns_path: str | Path, func: Callable[[], T]) -> T:
    """Run ``func`` in a new thread that has joined the network namespace; return its result.

    setns(CLONE_NEWNET) affects only the calling thread, so the harness itself stays where it was.
    """
    box: dict[str, object] = {}

    def body() -> None:
        try:
            fd = os.open(str(netns_path), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns_path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["result"] = func()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    t = threading.Thread(target=body, name="in-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise NetemError(f"{' '.join(argv)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


# ---------------------------------------------------------------------------------------------
# The shaped namespace
# ---------------------------------------------------------------------------------------------


class ShapedNetns:
    """A network namespace ``lzb-<pid>[-n]`` whose loopback is shaped to ``link``.

    ``with ShapedNetns(link) as ns:`` creates the namespace with ``lo`` up but unshaped (so images
    can be pushed at full speed); :meth:`shape` then applies rate and delay. Leaving the block (or
    interpreter exit) removes everything.
    """

    _counter = 0

    def __init__(self, link: Link, name: str | None = None) -> None:
        self.link = link
        if name is None:
            ShapedNetns._counter += 1
            name = f"{NAME_PREFIX}{os.getpid()}" + (f"-{ShapedNetns._counter}" if ShapedNetns._counter > 1 else "")
        self.name = name
        self._delayer: subprocess.Popen[str] | None = None
        self._rule_added = False
        self._created = False
        self.shaped = False

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    @property
    def prefix(self) -> list[str]:
        """Prepend to an argv to run it inside the namespace."""
        return ["nsenter", f"--net={self.path}"]

    def create(self) -> ShapedNetns:
        remove_stale_namespaces()
        _run(["ip", "netns", "add", self.name])
        self._created = True
        atexit.register(self.close)
        _run(["ip", "-n", self.name, "link", "set", "lo", "up"])
        return self

    def shape(self) -> None:
        """Apply the link's rate (HTB on lo) and delay (NFQUEUE delayer on INPUT)."""
        if self.shaped:
            return
        self._add_htb()
        delay_ms = self.link.rtt_s * 1000 / 2
        if delay_ms > 0:
            self._delayer = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "integration.netem", "--delayer", str(QUEUE_NUM), str(delay_ms)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                cwd=str(Path(__file__).resolve().parent.parent),
            )
            line = self._delayer.stdout.readline() if self._delayer.stdout else ""
            if line.strip() != "ready":
                err = self._delayer.stderr.read() if self._delayer.stderr else ""
                self._stop_delayer()
                raise NetemError(f"NFQUEUE delayer did not start: {line.strip()} {err.strip()}")
            _run([*self.prefix, "iptables", "-w", "-A", "INPUT", "-j", "NFQUEUE", "--queue-num", str(QUEUE_NUM)])
            self._rule_added = True
        self.shaped = True

    def _add_htb(self) -> None:
        from pyroute2 import NetNS

        ns = NetNS(self.name)
        try:
            idx = ns.link_lookup(ifname="lo")[0]
            # lo's MTU is 64 KiB (and GSO makes skbs of that size): the burst must hold one.
            burst = max(64 * 1024 + 1024, self.link.rate_bps // 8 // 1000)
            ns.tc("add", "htb", idx, 0x10000, default=0x10)
            ns.tc("add-class", "htb", idx, 0x10010, parent=0x10000, rate=f"{self.link.rate_bps}bit",
                  ceil=f"{self.link.rate_bps}bit", burst=burst, cburst=burst)
        finally:
            ns.close()

    def _stop_delayer(self) -> None:
        proc, self._delayer = self._delayer, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for f in (proc.stdout, proc.stderr):
            if f:
                f.close()

    def delayer_alive(self) -> bool:
        return self._delayer is not None and self._delayer.poll() is None

    def unshape(self) -> None:
        """Remove the iptables rule, the delayer and the qdisc; the namespace stays."""
        if self._rule_added:
            _run([*self.prefix, "iptables", "-w", "-D", "INPUT", "-j", "NFQUEUE", "--queue-num", str(QUEUE_NUM)],
                 check=False)
            self._rule_added = False
        self._stop_delayer()
        if self.shaped and self._created:
            _run(["tc", "-n", self.name, "qdisc", "del", "dev", "lo", "root"], check=False)
        self.shaped = False

    def close(self) -> None:
        """Undo everything; safe to call twice and from atexit."""
        self.unshape()
        if self._created:
            _run(["ip", "netns", "del", self.name], check=False)
            self._created = False
            atexit.unregister(self.close)

    def __enter__(self) -> ShapedNetns:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- measuring ------------------------------------------------------------------------------

    def measure_rtt(self, samples: int = 9) -> float:
        """Median TCP connect time to a listener inside the namespace (SYN → SYN/ACK = one RTT)."""

        def body() -> float:
            with socket.socket() as srv:
                srv.bind(("127.0.0.1", 0))
                srv.listen(64)
                times = []
                for _ in range(samples):
                    c = socket.socket()
                    t0 = time.perf_counter()
                    c.connect(srv.getsockname())
                    times.append(time.perf_counter() - t0)
                    c.close()
                    srv.accept()[0].close()
                return statistics.median(times)

        return in_netns(self.path, body)

    def measure_goodput(self, nbytes: int | None = None) -> float:
        """Bytes/s of one TCP transfer inside the namespace, timed from first to last byte."""
        if nbytes is None:
            nbytes = max(1 << 20, int(self.link.bytes_per_s * 1.5)) if self.shaped else 64 << 20

        def body() -> float:
            with socket.socket() as srv:
                srv.bind(("127.0.0.1", 0))
                srv.listen(1)

                def send() -> None:
                    conn, _ = srv.accept()
                    with conn:
                        chunk = b"\0" * (256 << 10)
                        left = nbytes
                        while left > 0:
                            left -= conn.send(chunk[: min(left, len(chunk))])

                t = threading.Thread(target=send, daemon=True)
                t.start()
                with socket.create_connection(srv.getsockname()) as c:
                    got = len(c.recv(1 << 20))
                    t0 = time.perf_counter()
                    while got < nbytes:
                        n = len(c.recv(1 << 20))
                        if n == 0:
                            break
                        got += n
                    dt = time.perf_counter() - t0
                t.join(timeout=10)
                return got / dt if dt > 0 else float("inf")

        return in_netns(self.path, body)

    def verify(self, rtt_tolerance: float = 0.3,
               goodput_range: tuple[float, float] = (0.7, 1.1)) -> tuple[float, float]:
        """Measure RTT and goodput and raise unless they are within tolerance of the target."""
        rtt = self.measure_rtt()
        goodput = self.measure_goodput()
        want = self.link.rtt_s
        if want > 0 and abs(rtt - want) > rtt_tolerance * want:
            raise NetemError(f"measured RTT {rtt * 1000:.1f} ms, wanted {want * 1000:g} ms ±{rtt_tolerance:.0%}")
        lo, hi = goodput_range
        if not lo * self.link.bytes_per_s <= goodput <= hi * self.link.bytes_per_s:
            raise NetemError(f"measured goodput {goodput * 8 / 1e6:.1f} Mbit/s, wanted "
                             f"{lo * self.link.rate_bps / 1e6:.0f}–{hi * self.link.rate_bps / 1e6:.0f} Mbit/s")
        return rtt, goodput


@contextlib.contextmanager
def shaped_netns(link: Link | str, *, shape: bool = True):
    """``with shaped_netns("100mbit:20ms") as ns:`` — created, optionally shaped, always removed."""
    ns = ShapedNetns(Link.parse(link) if isinstance(link, str) else link)
    with ns:
        if shape:
            ns.shape()
        yield ns


def remove_stale_namespaces() -> list[str]:
    """Delete ``lzb-<pid>`` namespaces whose creating process is gone (a SIGKILLed earlier run)."""
    removed = []
    if not NETNS_DIR.is_dir():
        return removed
    for p in NETNS_DIR.iterdir():
        m = re.fullmatch(rf"{NAME_PREFIX}(\d+)(?:-\d+)?", p.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            _run(["ip", "netns", "del", p.name], check=False)
            removed.append(p.name)
    return removed


def our_namespaces() -> list[str]:
    """Names of namespaces this module would have created (for leak checks)."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(NAME_PREFIX))


# ---------------------------------------------------------------------------------------------
# The NFQUEUE delayer (runs inside the namespace, as its own process)
# ---------------------------------------------------------------------------------------------

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR = 1, 2
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_COPY_META = 1
NFQA_CFG_F_GSO = 1 << 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
NF_ACCEPT = 1
SO_RCVBUFFORCE = 33
PR_SET_PDEATHSIG = 1


def _attr(kind: int, payload: bytes) -> bytes:
    a = struct.pack("=HH", 4 + len(payload), kind) + payload
    return a + b"\0" * (-len(a) % 4)


def _nfq_msg(msg: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg, flags, seq, 0) + body


def _config(sock: socket.socket, queue: int, attrs: bytes, seq: int) -> None:
    sock.send(_nfq_msg(NFQNL_MSG_CONFIG, queue, attrs, NLM_F_REQUEST | NLM_F_ACK, seq))
    data = sock.recv(65536)
    length, kind = struct.unpack_from("=IH", data)
    if kind == NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", data, 16)
        if err:
            raise OSError(-err, f"NFQUEUE config: {os.strerror(-err)}")


def _packet_ids(data: bytes) -> list[int]:
    """Packet ids of every NFQNL_MSG_PACKET in a netlink datagram."""
    ids = []
    off = 0
    while off + 16 <= len(data):
        length, kind = struct.unpack_from("=IH", data, off)
        if length < 16:
            break
        if kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            a = off + 20  # nlmsghdr + nfgenmsg
            while a + 4 <= off + length:
                alen, atype = struct.unpack_from("=HH", data, a)
                if alen < 4:
                    break
                if atype & 0x3FFF == NFQA_PACKET_HDR:
                    ids.append(struct.unpack_from("!I", data, a + 4)[0])
                    break
                a += (alen + 3) & ~3
        off += (length + 3) & ~3
    return ids


def run_delayer(queue: int, delay_s: float) -> int:
    """Hold every packet of ``queue`` for ``delay_s``, then accept it (FIFO, batch verdicts)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # never outlive the harness
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
    sock.bind((0, 0))
    _config(sock, queue, _attr(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, 0)), 1)
    _config(sock, queue, _attr(NFQA_CFG_PARAMS, struct.pack("!IB", 0, NFQNL_COPY_META))
            + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", 65536))
            + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_GSO))
            + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_GSO)), 2)
    sock.setblocking(False)
    print("ready", flush=True)
    pending: collections.deque[tuple[float, int]] = collections.deque()
    while True:
        now = time.monotonic()
        # select(), not poll(): poll rounds the timeout up to whole milliseconds, a visible error at 5 ms RTT.
        timeout = None if not pending else max(0.0, pending[0][0] - now)
        if select.select([sock], [], [], timeout)[0]:
            while True:
                try:
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    break
                except OSError as exc:  # ENOBUFS: a later batch verdict releases the lost ids too
                    print(f"delayer: {exc}", file=sys.stderr)
                    continue
                due = time.monotonic() + delay_s
                pending.extend((due, pid) for pid in _packet_ids(data))
        now = time.monotonic()
        last = None
        while pending and pending[0][0] <= now:
            last = pending.popleft()[1]
        if last is not None:
            hdr = _attr(NFQA_VERDICT_HDR, struct.pack("!II", NF_ACCEPT, last))
            sock.send(_nfq_msg(NFQNL_MSG_VERDICT_BATCH, queue, hdr))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m integration.netem",
                                description="Create a shaped namespace and report what it achieves.")
    p.add_argument("--link", default="100mbit:20ms")
    p.add_argument("--delayer", nargs=2, metavar=("QUEUE", "DELAY_MS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.delayer:
        return run_delayer(int(args.delayer[0]), float(args.delayer[1]) / 1000)
    try:
        link = Link.parse(args.link)
        with shaped_netns(link) as ns:
            rtt, goodput = ns.verify()
            print(f"{ns.name}: target {link}; measured RTT {rtt * 1000:.1f} ms, "
                  f"goodput {goodput * 8 / 1e6:.1f} Mbit/s")
    except (NetemError, ValueError, OSError) as exc:
        print(f"netem: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
