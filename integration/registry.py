"""A real OCI registry (Distribution's ``docker-registry``) on loopback, for integration tests.

Why the real one: lazy pulling lives or dies by HTTP details (Range requests answered with 206,
blob redirects, digest headers), and a fake registry would only test our own assumptions.
Each instance gets its own port, storage directory and access log, so tests can count the bytes
the registry actually served per blob and corrupt blobs on disk without touching anything shared.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from integration.procs import stop_group

REGISTRY_BIN = "/usr/bin/docker-registry"

# Distribution writes its access log (gorilla's CombinedLoggingHandler) to stdout, one line per
# request, in Apache "combined" format; its own diagnostics go to stderr. Example:
# 127.0.0.1 - - [28/Nov/2026:00:55:00 +0000] "GET /v2/x/blobs/sha256:ab.. HTTP/1.1" 206 1234 "" "ua"
_ACCESS_RE = re.compile(
    r'^(?P<client>\S+) \S+ \S+ \[(?P<time>[^\]]+)\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" '
    r"(?P<status>\d{3}) (?P<size>\d+|-)"
)
_BLOB_PATH_RE = re.compile(r"^/v2/(?P<repo>.+)/blobs/(?P<digest>[a-z0-9]+:[a-f0-9]+)$")


class RegistryError(RuntimeError):
    """The registry could not be started or answered unexpectedly."""


@dataclass(frozen=True)
class AccessLogEntry:
    """One request as the registry logged it (after the response was written)."""

    method: str
    path: str
    status: int
    size: int

    @property
    def blob_digest(self) -> str | None:
        """The digest if this was a blob request (``/v2/<repo>/blobs/<digest>``), else None."""
        m = _BLOB_PATH_RE.match(self.path.split("?", 1)[0])
        return m.group("digest") if m else None


def _free_port() -> int:
    """Ask the kernel for an unused loopback port (a race is handled by the start-up retry)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config_yaml(port: int, storage: Path, proxy_remote: str | None = None) -> str:
    """A minimal registry config: loopback only, filesystem storage, delete on, access log on.

    The health checker and upload purging are off because they only add background goroutines
    and log noise during a short test session.  With `proxy_remote` it is a pull-through cache
    of that registry (read-only: it fetches what it lacks from there and keeps a copy).
    """
    proxy = f"proxy:\n  remoteurl: {proxy_remote}\n" if proxy_remote else ""
    return proxy + (
        "version: 0.1\n"
        "log:\n"
        "  level: info\n"
        "  formatter: text\n"
        "  accesslog:\n"
        "    disabled: false\n"
        "storage:\n"
        "  filesystem:\n"
        f"    rootdirectory: {storage}\n"
        "  delete:\n"
        "    enabled: true\n"
        "  maintenance:\n"
        "    uploadpurging:\n"
        "      enabled: false\n"
        "http:\n"
        f"  addr: 127.0.0.1:{port}\n"
        "health:\n"
        "  storagedriver:\n"
        "    enabled: false\n"
    )


class Registry:
    """A throw-away ``docker-registry`` bound to 127.0.0.1 on a free port.

    Use as a context manager (or call :meth:`start` / :meth:`stop`). Everything it writes lives
    under one temporary directory that :meth:`stop` removes.
    """

    def __init__(
        self,
        *,
        start_timeout: float = 15.0,
        binary: str = REGISTRY_BIN,
        prefix_cmd: Sequence[str] = (),
        call_in: Callable[[Callable[[], Any]], Any] | None = None,
        proxy_remote: str | None = None,
    ) -> None:
        """``prefix_cmd`` (e.g. ``["nsenter", "--net=/run/netns/X"]``) runs the registry inside another
        network namespace; ``call_in(func)`` must then run ``func`` where it can reach that namespace's
        loopback (see ``integration.netem.in_netns``): the readiness probe goes through it. Clients
        talking to such a registry run with the same ``prefix_cmd``.  ``proxy_remote``
        (``http://127.0.0.1:PORT``) makes it a pull-through cache of that registry.
        """
        self._binary = binary
        self.proxy_remote = proxy_remote
        self._start_timeout = start_timeout
        self.prefix_cmd = list(prefix_cmd)
        self._call_in = call_in or (lambda func: func())
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> Registry:
        """Start the registry and return once ``GET /v2/`` answers (bounded by start_timeout)."""
        if not os.access(self._binary, os.X_OK):
            raise RegistryError(f"{self._binary} not found: install the docker-registry package")
        self._workdir = Path(tempfile.mkdtemp(prefix="lazyshim-registry-"))
        (self._workdir / "storage").mkdir()
        last_error = "never tried"
        for _attempt in range(3):  # another process may grab the port between probe and bind
            self.port = _free_port()
            config = self._workdir / "config.yml"
            config.write_text(_config_yaml(self.port, self.storage_dir, self.proxy_remote))
            with open(self.access_log_path, "ab") as out, open(self.error_log_path, "ab") as err:
                self._proc = subprocess.Popen(
                    [*self.prefix_cmd, self._binary, "serve", str(config)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
            try:
                self._wait_ready()
                return self
            except RegistryError as exc:
                last_error = str(exc)
                self._kill()
        self.stop()
        raise RegistryError(f"registry did not come up: {last_error}")

    def _wait_ready(self) -> None:
        """Poll ``/v2/`` with short waits until it answers 200, the process dies, or time is up."""
        assert self._proc is not None
        deadline = time.monotonic() + self._start_timeout
        url = f"http://{self.host}/v2/"

        def probe() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    return resp.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        while True:
            if self._proc.poll() is not None:
                raise RegistryError(f"exited with {self._proc.returncode}: {self._tail(self.error_log_path)}")
            if self._call_in(probe):
                return
            if time.monotonic() > deadline:
                raise RegistryError(f"no answer on {url} within {self._start_timeout:.0f}s")
            time.sleep(0.05)

    def _kill(self) -> None:
        """Terminate the registry's process group and reap it (SIGKILL after a bounded wait)."""
        proc, self._proc = self._proc, None
        stop_group(proc, 5)

    def stop(self) -> None:
        """Stop the registry and delete its storage and logs. Safe to call twice."""
        self._kill()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- where things are ------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Base URL for plain-HTTP API calls."""
        return f"http://{self.host}"

    @property
    def workdir(self) -> Path:
        """The private directory holding config, storage and logs."""
        if self._workdir is None:
            raise RegistryError("registry is not running")
        return self._workdir

    @property
    def storage_dir(self) -> Path:
        """Root of the filesystem storage driver (``docker/registry/v2/...`` lives below)."""
        return self.workdir / "storage"

    @property
    def access_log_path(self) -> Path:
        """File receiving the registry's stdout, i.e. the per-request access log."""
        return self.workdir / "access.log"

    @property
    def error_log_path(self) -> Path:
        """File receiving the registry's stderr (its application log)."""
        return self.workdir / "registry.log"

    def blob_path(self, repo: str, digest: str) -> Path:
        """The on-disk file holding a blob that ``repo`` references.

        Blobs are stored once per registry (content-addressed) but served only to repositories that
        link them, so a missing link is reported as an error: the test asked about the wrong repo.
        """
        algo, _, hexd = digest.partition(":")
        v2 = self.storage_dir / "docker" / "registry" / "v2"
        link = v2 / "repositories" / repo / "_layers" / algo / hexd / "link"
        if not link.is_file():
            raise RegistryError(f"repository {repo!r} does not link blob {digest}")
        data = v2 / "blobs" / algo / hexd[:2] / hexd / "data"
        if not data.is_file():
            raise RegistryError(f"blob {digest} is linked by {repo!r} but missing from storage")
        return data

    # -- what it served --------------------------------------------------------------------------

    def access_log(self) -> list[AccessLogEntry]:
        """Parse every request logged so far (lines that are not access-log lines are skipped)."""
        entries: list[AccessLogEntry] = []
        try:
            text = self.access_log_path.read_text(errors="replace")
        except FileNotFoundError:
            return entries
        for line in text.splitlines():
            m = _ACCESS_RE.match(line)
            if m:
                size = m.group("size")
                entries.append(
                    AccessLogEntry(
                        method=m.group("method"),
                        path=m.group("path"),
                        status=int(m.group("status")),
                        size=0 if size == "-" else int(size),
                    )
                )
        return entries

    def blob_requests(self, digest: str) -> list[AccessLogEntry]:
        """All logged GET requests for one blob, in any repository."""
        return [e for e in self.access_log() if e.method == "GET" and e.blob_digest == digest]

    def bytes_served(self, digest: str, *, min_requests: int = 0, timeout: float = 5.0) -> int:
        """Body bytes the registry sent for GETs of ``digest`` (all repos, all statuses).

        The registry logs a request only after the handler returns, which can be a moment after
        the client has the last byte; pass ``min_requests`` to poll (bounded by ``timeout``) until
        that many requests for the blob have been logged.
        """
        deadline = time.monotonic() + timeout
        while True:
            reqs = self.blob_requests(digest)
            if len(reqs) >= min_requests:
                return sum(e.size for e in reqs)
            if time.monotonic() > deadline:
                raise RegistryError(
                    f"only {len(reqs)} of {min_requests} requests for {digest} logged in {timeout}s"
                )
            time.sleep(0.02)

    def clear_access_log(self) -> None:
        """Forget logged requests, so a test counts only its own traffic (the registry appends)."""
        with open(self.access_log_path, "r+b") as f:
            f.truncate(0)

    @staticmethod
    def _tail(path: Path, limit: int = 400) -> str:
        """The end of a log file on one line, for error messages."""
        try:
            text = path.read_text(errors="replace").strip()
        except FileNotFoundError:
            return "(no log)"
        return " | ".join(text[-limit:].splitlines()) or "(empty log)"
