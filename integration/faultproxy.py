"""A small HTTP proxy in front of the real registry that breaks blob reads on purpose.

Why: lazy pulling must stay correct when the network or the registry misbehaves, and the
real registry never does so on cue.  Tests start one proxy per test on loopback, pull
through it, then choose a fault; every blob GET with a Range header (what a fill sends) is
then broken in that way, for the next `count` requests or until `clear()`.  Everything
else (manifests, the TOC read by the pull before a fault is set) is passed through.

Faults: reset (RST mid-body), status (e.g. 503, or 429 with Retry-After), truncate (FIN
mid-body after a full Content-Length), corrupt (same length, wrong bytes), stall (accept
and never answer), and `vanish()`/`come_back()` (the port refuses connections, then
listens again).
"""

from __future__ import annotations

import http.client
import http.server
import socket
import socketserver
import struct
import threading
from dataclasses import dataclass, field

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "host"}


@dataclass
class Fault:
    kind: str  # reset | status | truncate | corrupt | stall
    count: int | None = None  # None: every matching request until cleared
    status: int = 503
    headers: dict[str, str] = field(default_factory=dict)


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream  # host:port of the real registry
        self.fault: Fault | None = None
        self.faulted = 0  # blob range requests answered with a fault
        self.passed = 0  # blob range requests passed through
        self.ranges: list[tuple[str, str]] = []  # (blob digest, Range header) of every blob range GET, as they arrive
        self._lock = threading.Lock()
        self._released = threading.Event()  # ends stalls
        self._server: _Server | None = None
        self._conns: set[socket.socket] = set()  # open client connections, cut by vanish()
        self.port = 0

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> FaultProxy:
        self._serve(0)
        return self

    def _serve(self, port: int) -> None:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = _Server(("127.0.0.1", port), Handler)
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True, name="faultproxy").start()

    def stop(self) -> None:
        self._released.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def vanish(self) -> None:
        """Stop listening and cut every open connection: connecting to the port is refused
        until come_back()."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            conns, self._conns = list(self._conns), set()
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def come_back(self) -> None:
        self._serve(self.port)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- faults ----------------------------------------------------------------------
    def set(self, fault: Fault) -> None:
        with self._lock:
            self.fault = fault

    def clear(self) -> None:
        with self._lock:
            self.fault = None
        self._released.set()
        self._released = threading.Event()

    def _take(self) -> Fault | None:
        with self._lock:
            f = self.fault
            if f is None:
                self.passed += 1
                return None
            if f.count is not None:
                f.count -= 1
                if f.count <= 0:
                    self.fault = None
            self.faulted += 1
            return f


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FaultProxy

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._conns.add(self.connection)

    def finish(self) -> None:
        with self.owner._lock:
            self.owner._conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass  # a connection this proxy cut on purpose

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: tests read counters
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._forward()

    def do_HEAD(self) -> None:  # noqa: N802
        self._forward()

    def _forward(self) -> None:
        fault = None
        if "/blobs/" in self.path and self.headers.get("Range") and self.command == "GET":
            with self.owner._lock:
                self.owner.ranges.append((self.path.rsplit("/", 1)[-1], self.headers["Range"]))
            fault = self.owner._take()
        if fault is not None and fault.kind == "stall":
            self.owner._released.wait()
            self.close_connection = True
            return
        if fault is not None and fault.kind == "status":
            body = b'{"errors":[{"code":"UNAVAILABLE","message":"injected"}]}'
            self.send_response(fault.status)
            for k, v in fault.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        status, headers, body = self._upstream()
        if fault is not None and fault.kind == "corrupt" and body:
            body = bytes(b ^ 0x5A for b in body)
        self.send_response(status)
        for k, v in headers:
            if k.lower() not in _HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault is not None and fault.kind in ("reset", "truncate"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if fault.kind == "reset":  # RST instead of FIN: the client sees a connection reset
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()  # closed for real once the request's reader is closed
            self.close_connection = True
            return
        self.wfile.write(body)

    def _upstream(self) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.owner.upstream, timeout=60)
        try:
            hdrs = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            conn.request(self.command, self.path, headers=hdrs)
            resp = conn.getresponse()
            body = resp.read()
            return resp.status, resp.getheaders(), body
        finally:
            conn.close()
