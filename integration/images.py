"""Reproducible test images in real lazy-pull formats, built from local files only.

Why built here: the machine (and CI) has no Docker Hub, and lazyshim must be tested against the
formats real tools produce, not ones we imagine. So each image is written as a plain OCI layout by a
small deterministic writer (sorted entries, fixed mtimes and owners, gzip without name/time), pushed
to a loopback registry with ``skopeo``, and then converted by the reference tools:

- ``legacy``: the gzip layers as written here;
- ``esgz``: ``ctr-remote image convert --oci --estargz`` (stargz-snapshotter's converter);
- ``zstdchunked``: ``ctr-remote image convert --oci --zstdchunked``;
- ``podman-zstdchunked``: ``podman push --compression-format zstd:chunked`` (containers/storage's
  own zstd:chunked writer, which differs from ctr-remote's in annotations and TOC placement);
- ``esgz-opt`` (on request, for the benchmark): ``ctr-remote image optimize --oci``, which runs a
  given workload in a container under the private containerd and writes eStargz with the files it
  opened first (before the prefetch landmark); cached per workload.

Every finished variant is cached as an OCI layout under ``<repo>/.cache/images/<name>-<key>/`` where
the key hashes the full input description (host file sizes and mtimes included), so later sessions
only re-push with ``skopeo copy --preserve-digests`` and need neither containerd nor podman.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from integration.procs import stop_group
from integration.registry import Registry

# Bump when the writer or an image's contents change in a way the input hash cannot see.
BUILD_VERSION = "1"
FIXED_MTIME = 1_700_000_000  # any constant works; a real date keeps tools from warning about 1970
FIXED_CREATED = "2023-11-14T22:13:20Z"  # FIXED_MTIME as RFC 3339, for the image config
NAMESPACE = "lazyshim-test"  # containerd namespace of the private converter instance

VARIANTS = ("legacy", "esgz", "zstdchunked", "podman-zstdchunked")
OPTIMIZED = "esgz-opt"  # built only when asked for, with the workload to optimize for
NAMES = ("busybox", "python")

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_ROOT = REPO_ROOT / ".cache" / "images"

MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_INDEX = "application/vnd.oci.image.index.v1+json"

ESGZ_TOC_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"

REQUIRED_BINARIES = (
    "/usr/bin/docker-registry",
    "skopeo",
    "containerd",
    "ctr-remote",
    "podman",
    "umoci",
    "runc",
)


class ImageBuildError(RuntimeError):
    """A step of building, converting or pushing a test image failed."""


@dataclass(frozen=True)
class OptimizeRun:
    """The workload ``ctr-remote image optimize`` runs to learn which files the image should hold first."""

    args: tuple[str, ...]
    user: str = ""

    def key(self) -> str:
        """Short hash naming the cached optimized layout: another workload is another image."""
        return hashlib.sha256(json.dumps([list(self.args), self.user]).encode()).hexdigest()[:8]

    def ctr_flags(self) -> list[str]:
        """Flags for ``ctr-remote image optimize`` (it exits when the workload does, within --period)."""
        flags = ["--period", "120", "--entrypoint", json.dumps(list(self.args[:1])),
                 "--args", json.dumps(list(self.args[1:]))]
        return [*flags, "--user", self.user] if self.user else flags


# ---------------------------------------------------------------------------------------------
# Image description: what goes into each layer
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One tar member. Exactly one of ``data``/``source`` is set for regular files."""

    path: str  # inside the image, relative, no leading slash
    kind: str  # "file" | "dir" | "symlink" | "hardlink"
    mode: int = 0o644
    data: bytes | None = None
    source: Path | None = None  # host file copied verbatim
    linkname: str = ""  # symlink target, or hardlink target path (relative, no slash)

    def fingerprint(self) -> str:
        """A stable description of this entry, host file identity included, for the cache key."""
        parts = [self.path, self.kind, oct(self.mode), self.linkname]
        if self.data is not None:
            parts.append(hashlib.sha256(self.data).hexdigest())
        if self.source is not None:
            st = self.source.stat()
            parts += [str(self.source), str(st.st_size), str(st.st_mtime_ns)]
        return "\0".join(parts)


@dataclass(frozen=True)
class TarLayer:
    """A layer given as a ready uncompressed tar (e.g. a debootstrap root), used byte for byte.

    For trees a ``_LayerBuilder`` cannot describe: owners other than root, device nodes, xattrs.
    """

    path: Path

    def fingerprint(self) -> str:
        st = self.path.stat()
        # Resolved: a checkout whose .cache links to another's shares its builds (one key).
        return f"tar\0{self.path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}"


@dataclass
class ImageSpec:
    """An image as layers of entries plus the few config fields tests care about."""

    name: str
    layers: list[list[Entry] | TarLayer]
    cmd: list[str]
    env: list[str] = field(default_factory=lambda: ["PATH=/usr/local/bin:/usr/bin:/bin"])

    def cache_key(self) -> str:
        """Hash of everything that determines the built bytes."""
        h = hashlib.sha256(f"{BUILD_VERSION}\0{self.name}\0{self.cmd}\0{self.env}".encode())
        for i, layer in enumerate(self.layers):
            h.update(f"\0layer{i}\0".encode())
            if isinstance(layer, TarLayer):
                h.update(layer.fingerprint().encode())
                continue
            for e in layer:
                h.update(e.fingerprint().encode() + b"\n")
        return h.hexdigest()[:16]


class _LayerBuilder:
    """Collects entries for one layer, resolving host paths the way the kernel would.

    Host libraries are reached through symlinks (/lib64 -> usr/lib64, libz.so.1 -> libz.so.1.2.13),
    and the image must contain the same chain, because the runtime and lazyshim must follow it too.
    """

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def add(self, entry: Entry) -> None:
        """Add one entry (first one wins: resolving two paths can meet the same symlink)."""
        self.entries.setdefault(entry.path, entry)

    def file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file with inline content."""
        self.add(Entry(path.lstrip("/"), "file", mode, data=data))

    def symlink(self, path: str, target: str) -> None:
        """Add a symlink (target kept verbatim: absolute targets are part of the test)."""
        self.add(Entry(path.lstrip("/"), "symlink", 0o777, linkname=target))

    def hardlink(self, path: str, target: str) -> None:
        """Add a hardlink to an entry already in this layer."""
        self.add(Entry(path.lstrip("/"), "hardlink", 0o644, linkname=target.lstrip("/")))

    def dir(self, path: str, mode: int = 0o755) -> None:
        """Add a directory with an explicit mode (parents are added implicitly with 0755)."""
        self.add(Entry(path.lstrip("/"), "dir", mode))

    def host(self, host_path: str | Path, image_path: str | None = None) -> None:
        """Copy a host path, recording every symlink met on the way, into the image.

        With ``image_path`` the final file lands there instead (no symlink resolution).
        """
        if image_path is not None:
            src = Path(host_path).resolve()
            self.add(Entry(image_path.lstrip("/"), "file", stat.S_IMODE(src.stat().st_mode), source=src))
            return
        pending = [p for p in Path(host_path).parts[1:]]
        done: list[str] = []
        hops = 0
        while pending:
            part = pending.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            cur = "/" + "/".join([*done, part])
            st = os.lstat(cur)
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > 40:
                    raise ImageBuildError(f"symlink loop resolving {host_path}")
                target = os.readlink(cur)
                self.symlink(cur, target)
                if target.startswith("/"):
                    done = []
                pending = [*Path(target).parts[(1 if target.startswith("/") else 0) :], *pending]
            elif stat.S_ISDIR(st.st_mode):
                done.append(part)
            elif stat.S_ISREG(st.st_mode):
                if pending:
                    raise ImageBuildError(f"{cur} is a file but {host_path} goes on below it")
                self.add(Entry(cur.lstrip("/"), "file", stat.S_IMODE(st.st_mode), source=Path(cur)))
                return
            else:
                raise ImageBuildError(f"{cur}: unsupported file type for a test image")
        # A directory: nothing to add (parents are implicit).

    def tree(self, root: str, exclude_dirs: set[str], image_root: str | None = None) -> None:
        """Copy a host directory tree (sorted walk), skipping directories by name."""
        base = Path(root)
        dest = (image_root or root).lstrip("/")
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if d not in exclude_dirs)
            rel_dir = Path(dirpath).relative_to(base)
            for name in sorted(filenames) + [d for d in dirnames if os.path.islink(Path(dirpath, d))]:
                src = Path(dirpath, name)
                ipath = str(Path(dest, rel_dir, name))
                st = os.lstat(src)
                if stat.S_ISLNK(st.st_mode):
                    target = os.readlink(src)
                    self.symlink(ipath, target)
                    resolved = Path(dirpath, target).resolve() if not target.startswith("/") else Path(target)
                    if not str(resolved).startswith(str(base) + "/") and resolved.exists():
                        self.host(resolved)  # e.g. sitecustomize.py -> /etc/python3.11/...
                elif stat.S_ISREG(st.st_mode):
                    self.add(Entry(ipath, "file", stat.S_IMODE(st.st_mode), source=src))


def _etc_files(b: _LayerBuilder) -> None:
    """/etc/passwd and /etc/group: runc reads them to resolve the user, lazyshim must pre-fill them."""
    b.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    b.file("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    for d in ("dev", "proc", "sys", "root"):
        b.dir(d, 0o755 if d != "root" else 0o700)
    b.dir("tmp", 0o1777)


BUSYBOX_APPLETS = (
    "sh",
    "ls",
    "cat",
    "echo",
    "true",
    "false",
    "sleep",
    "sha256sum",
    "stat",
    "wc",
    "head",
    "env",
)
RANDOM_FILE_SIZE = (4 << 20) + (1 << 19) + 7  # > the 4 MiB default eStargz chunk, unaligned: 2+ chunks


def busybox_spec() -> ImageSpec:
    """busybox-static plus files exercising every tar member kind lazyshim must reproduce."""
    base = _LayerBuilder()
    base.host("/bin/busybox", "bin/busybox")
    for applet in BUSYBOX_APPLETS:
        base.symlink(f"bin/{applet}", "busybox")
    _etc_files(base)

    app = _LayerBuilder()
    app.file("app/hello.txt", b"hello from the app layer\n")
    app.hardlink("app/hello-hardlink.txt", "app/hello.txt")
    app.symlink("app/passwd-abs-link", "/etc/passwd")  # absolute: must resolve inside the container
    app.file("app/suid-script.sh", b"#!/bin/sh\necho suid\n", 0o4755)
    app.file("app/empty", b"")
    app.file("app/random.bin", random.Random(20240601).randbytes(RANDOM_FILE_SIZE))
    app.file("app/hello.sh", b"#!/bin/sh\necho hello from busybox sh\n", 0o755)
    return ImageSpec(
        "busybox",
        [_finish(base), _finish(app)],
        cmd=["/app/hello.sh"],
        env=["PATH=/bin"],
    )


PYTHON_BIN = "/usr/bin/python3.11"
PYTHON_LIB = "/usr/lib/python3.11"
# Excluded to keep the image small; config-3.11-* alone is a 25 MB static libpython.
PYTHON_EXCLUDE = {
    "test",
    "tests",
    "idlelib",
    "tkinter",
    "ensurepip",
    "__pycache__",
    "lib2to3",
    "turtledemo",
    "config-3.11-x86_64-linux-gnu",
}
HELLO_PY_OUTPUT = "hello from python in a lazy image"


def _ldd_paths(binary: str) -> list[str]:
    """Absolute paths of the shared libraries (and ELF interpreter) a host binary loads."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=True).stdout
    paths: list[str] = []
    for line in out.splitlines():
        words = line.split()
        if "=>" in words:
            after = words[words.index("=>") + 1]
            if after.startswith("/"):
                paths.append(after)
        elif words and words[0].startswith("/"):
            paths.append(words[0])  # the interpreter line: /lib64/ld-linux-x86-64.so.2 (0x...)
    return paths


def python_spec() -> ImageSpec:
    """Debian's python3.11 with its libraries: a realistic many-file image (about 700 entries)."""
    base = _LayerBuilder()
    for top in ("bin", "lib", "lib64", "sbin"):
        if os.path.islink(f"/{top}"):
            base.symlink(top, os.readlink(f"/{top}"))  # merged /usr, as on the host
    for lib in _ldd_paths(PYTHON_BIN):
        base.host(lib)
    _etc_files(base)

    app = _LayerBuilder()
    app.host(PYTHON_BIN)
    app.symlink("usr/bin/python3", "python3.11")
    app.tree(PYTHON_LIB, PYTHON_EXCLUDE)
    app.file("usr/local/bin/hello.py", f"#!/usr/bin/python3\nprint({HELLO_PY_OUTPUT!r})\n".encode(), 0o755)
    return ImageSpec("python", [_finish(base), _finish(app)], cmd=["/usr/local/bin/hello.py"])


def _finish(b: _LayerBuilder) -> list[Entry]:
    """Entries in tar order: parents implied, sorted by path, hardlinks after their targets."""
    entries = dict(b.entries)
    for path in list(entries):
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            entries.setdefault(parent, Entry(parent, "dir", 0o755))
    ordered = sorted(entries.values(), key=lambda e: (e.kind == "hardlink", e.path))
    return ordered


SPECS: dict[str, Callable[[], ImageSpec]] = {"busybox": busybox_spec, "python": python_spec}


def register_spec(name: str, factory: Callable[[], ImageSpec]) -> None:
    """Make another image buildable by :func:`build_and_push` (the benchmark's Debian images)."""
    SPECS[name] = factory


# ---------------------------------------------------------------------------------------------
# Deterministic OCI layout writer
# ---------------------------------------------------------------------------------------------


def _tar_layer(entries: Sequence[Entry]) -> bytes:
    """An uncompressed tar of the entries with fixed owners and mtimes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.path + ("/" if e.kind == "dir" else ""))
            info.mtime = FIXED_MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = e.mode
            payload: bytes | None = None
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
            elif e.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, e.linkname
            elif e.kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, e.linkname
            else:
                payload = e.data if e.data is not None else Path(str(e.source)).read_bytes()
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    """gzip with no file name and mtime 0, so equal input gives equal bytes."""
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=6, mtime=0) as gz:
        gz.write(data)
    return out.getvalue()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_oci_layout(spec: ImageSpec, dest: Path, tag: str = "legacy") -> str:
    """Write ``spec`` as an OCI image layout at ``dest`` (which must not exist); return the
    manifest digest. The layout has one manifest, tagged via ``org.opencontainers.image.ref.name``.
    """
    blobs = dest / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes) -> str:
        digest = _sha256(data)
        (blobs / digest.split(":", 1)[1]).write_bytes(data)
        return digest

    layers, diff_ids = [], []
    for entries in spec.layers:
        tar = entries.path.read_bytes() if isinstance(entries, TarLayer) else _tar_layer(entries)
        diff_ids.append(_sha256(tar))
        gz = _gzip(tar)
        layers.append({"mediaType": MT_LAYER_GZIP, "digest": put(gz), "size": len(gz)})
    config = {
        "created": FIXED_CREATED,
        "architecture": "amd64",
        "os": "linux",
        "config": {"Env": spec.env, "Cmd": spec.cmd, "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": FIXED_CREATED, "created_by": f"lazyshim integration/images.py layer {i}"}
            for i in range(len(layers))
        ],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MT_MANIFEST,
        "config": {"mediaType": MT_CONFIG, "digest": put(config_bytes), "size": len(config_bytes)},
        "layers": layers,
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    mdigest = put(manifest_bytes)
    index = {
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": [
            {
                "mediaType": MT_MANIFEST,
                "digest": mdigest,
                "size": len(manifest_bytes),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (dest / "index.json").write_text(json.dumps(index, sort_keys=True))
    (dest / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return mdigest


# ---------------------------------------------------------------------------------------------
# Tools: skopeo, a private containerd for ctr-remote, a private podman
# ---------------------------------------------------------------------------------------------


def _run(
    argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 300, prefix: Sequence[str] = ()
) -> str:
    """Run a tool; on failure raise with the command and the tail of its stderr on one line.

    ``prefix`` (a registry's ``prefix_cmd``) runs it where that registry's loopback is.
    """
    try:
        proc = subprocess.run([*prefix, *argv], capture_output=True, text=True, env=env, timeout=timeout)
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{argv[0]} not found: {exc}") from None
    except subprocess.TimeoutExpired:
        raise ImageBuildError(f"{' '.join(argv[:4])} ... timed out after {timeout}s") from None
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise ImageBuildError(f"{' '.join(argv[:4])} ... failed ({proc.returncode}): {tail}")
    return proc.stdout


def check_tools() -> None:
    """Fail with one clear line naming every missing tool (tests must not skip silently)."""
    missing = [b for b in REQUIRED_BINARIES if shutil.which(b) is None]
    if missing:
        raise ImageBuildError(f"missing tools: {', '.join(missing)} (run `make apt`)")


class PrivateEnv:
    """Environment isolating skopeo/podman from the host's containers state.

    containers/image keeps a blob-info cache (as root: /var/lib/containers/cache) that remembers
    which compressed blobs exist for a layer; podman 4.3 then silently pushes the cached gzip blob
    instead of compressing to zstd:chunked. A non-zero ``_CONTAINERS_ROOTLESS_UID`` makes the
    library place that cache under ``$XDG_DATA_HOME`` instead, which we point at a fresh directory.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "home").mkdir(parents=True, exist_ok=True)
        self.policy = root / "policy.json"
        self.policy.write_text('{"default":[{"type":"insecureAcceptAnything"}]}')

    def env(self, cache_name: str) -> dict[str, str]:
        """Env vars for one tool invocation with its own (initially empty) blob-info cache."""
        data_home = self.root / f"data-{cache_name}"
        data_home.mkdir(exist_ok=True)
        # With a non-root "rootless uid" the libraries also derive /run/user/1, /tmp/containers-user-1
        # and /var/tmp/containers-user-1 unless these point somewhere private.
        for d in ("run", "tmp", "config"):
            (self.root / d).mkdir(mode=0o700, exist_ok=True)
        return {
            **os.environ,
            "HOME": str(self.root / "home"),
            "XDG_DATA_HOME": str(data_home),
            "XDG_RUNTIME_DIR": str(self.root / "run"),
            "XDG_CONFIG_HOME": str(self.root / "config"),
            "TMPDIR": str(self.root / "tmp"),
            "_CONTAINERS_ROOTLESS_UID": "1",
        }


def skopeo_copy(
    src: str, dest: str, penv: PrivateEnv, *, preserve: bool = True, prefix: Sequence[str] = ()
) -> None:
    """``skopeo copy`` between ``oci:`` layouts and the plain-HTTP loopback registry."""
    argv = [
        "skopeo",
        "--policy",
        str(penv.policy),
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
    ]
    if preserve:
        argv.append("--preserve-digests")  # fail rather than recompress a converted blob
    _run([*argv, src, dest], env=penv.env("skopeo"), timeout=900, prefix=prefix)


#: Plugins a private test containerd does without (no CRI, no exotic snapshotters, no tracing).
PRIVATE_DISABLED_PLUGINS = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
]


def private_containerd_config(root: Path, state: Path, sock: Path, extra: str = "") -> str:
    """config.toml of a containerd of our own: its root, state and sockets, nothing under /opt;
    `extra` is appended (e.g. a proxy snapshotter)."""
    return (
        "version = 2\n"
        f'root = "{root}"\nstate = "{state}"\n'
        f"disabled_plugins = {json.dumps(PRIVATE_DISABLED_PLUGINS)}\n"
        f'[grpc]\n  address = "{sock}"\n'
        f'[ttrpc]\n  address = "{sock}.ttrpc"\n'
        '[debug]\n  address = ""\n'
        '[metrics]\n  address = ""\n'
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{root}/opt"\n'
        + extra
    )


class Containerd:
    """A private containerd (own root, state, socket) so ctr-remote can convert images.

    Plugins that need kernel features or host integration (CRI, btrfs/zfs/devmapper/aufs
    snapshotters, tracing) are disabled; the opt plugin is pointed inside the root so that nothing
    is written to /opt.
    """

    def __init__(self, workdir: Path, start_timeout: float = 30.0) -> None:
        self.dir = workdir
        self.sock = workdir / "containerd.sock"
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Containerd:
        """Start containerd and return once its gRPC socket accepts connections."""
        root, state = self.dir / "root", self.dir / "state"
        root.mkdir(parents=True)
        state.mkdir(parents=True)
        cfg = self.dir / "config.toml"
        cfg.write_text(private_containerd_config(root, state, self.sock))
        self.log = self.dir / "containerd.log"
        with open(self.log, "wb") as log:
            self._proc = subprocess.Popen(
                [
                    "containerd",
                    "--config",
                    str(cfg),
                    "--root",
                    str(root),
                    "--state",
                    str(state),
                    "--address",
                    str(self.sock),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self._proc.poll() is not None:
                tail = " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
                raise ImageBuildError(f"containerd exited with {self._proc.returncode}: {tail}")
            if self.sock.exists():
                with socket.socket(socket.AF_UNIX) as s, contextlib.suppress(OSError):
                    s.connect(str(self.sock))
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise ImageBuildError(f"containerd socket not ready within {self.start_timeout:.0f}s")
            time.sleep(0.05)

    def ctr(self, *args: str, timeout: float = 600, prefix: Sequence[str] = ()) -> str:
        """Run ``ctr-remote`` against this instance in the test namespace."""
        return _run(
            ["ctr-remote", "--address", str(self.sock), "--namespace", NAMESPACE, *args],
            timeout=timeout,
            prefix=prefix,
        )

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after a bounded wait."""
        proc, self._proc = self._proc, None
        stop_group(proc, 10)


def _podman_zstd_chunked(
    host: str, name: str, workdir: Path, penv: PrivateEnv, prefix: Sequence[str] = ()
) -> None:
    """Pull ``name:legacy`` into a private podman store and push it as ``name:podman-zstdchunked``.

    The push runs with a blob-info cache distinct from the pull's, so it cannot learn that a gzip
    version of each layer already exists in the registry and must compress anew.
    """
    base = [
        "podman",
        "--root",
        str(workdir / "root"),
        "--runroot",
        str(workdir / "runroot"),
        "--storage-driver",
        "vfs",
        "--events-backend",
        "none",
        "--cgroup-manager",
        "cgroupfs",
        "--tmpdir",
        str(workdir / "tmp"),
    ]
    ref = f"{host}/{name}:legacy"
    _run([*base, "pull", "--quiet", "--tls-verify=false", f"docker://{ref}"], env=penv.env("podman-pull"),
         prefix=prefix, timeout=900)
    _run(
        [
            *base,
            "push",
            "--quiet",
            "--tls-verify=false",
            "--compression-format",
            "zstd:chunked",
            ref,
            f"docker://{host}/{name}:podman-zstdchunked",
        ],
        env=penv.env(f"podman-push-{name}"),
        prefix=prefix,
        timeout=900,
    )
    _run([*base, "rmi", "--all", "--force"], env=penv.env("podman-pull"))


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------


@dataclass
class BuildStats:
    """What happened during :func:`build_and_push`, for reports and for the cache test."""

    built: list[str] = field(default_factory=list)  # "name:variant" produced from scratch
    from_cache: list[str] = field(default_factory=list)  # "name:variant" pushed from the cache
    failed: dict[str, str] = field(default_factory=dict)  # "name:variant" -> why it could not be built
    seconds: float = 0.0


def _cache_dir(spec: ImageSpec) -> Path:
    return CACHE_ROOT / f"{spec.name}-{spec.cache_key()}"


def _layout_dir(cdir: Path, variant: str, optimize: OptimizeRun | None) -> Path:
    """Where a variant's layout is cached; an optimized image per workload it was optimized for."""
    if variant != OPTIMIZED:
        return cdir / variant
    if optimize is None:
        raise ImageBuildError(f"{cdir.name}:{OPTIMIZED} needs the workload it is optimized for")
    return cdir / f"{variant}-{optimize.key()}"


def cached_layer_sizes(name: str, variant: str, optimize: OptimizeRun | None = None) -> list[int]:
    """Compressed layer sizes of a built ``name:variant`` as cached (what a registry serves), no network."""
    layout = _layout_dir(_cache_dir(SPECS[name]()), variant, optimize)
    try:
        index = json.loads((layout / "index.json").read_text())
        digest = index["manifests"][0]["digest"].split(":", 1)[1]
        manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
        return [int(layer["size"]) for layer in manifest["layers"]]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise ImageBuildError(f"{name}:{variant} is not in the cache ({layout}): {exc}") from None


def _publish(staging: Path, final: Path) -> None:
    """Move a finished layout into the cache; if a concurrent run got there first, keep theirs."""
    try:
        staging.rename(final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)


def _prune_stale(spec: ImageSpec, keep: Path) -> None:
    """Remove cached builds of this image made from older inputs (a checkout keeps only one)."""
    for old in CACHE_ROOT.glob(f"{spec.name}-*"):
        if old != keep and old.is_dir() and len(old.name) == len(keep.name):
            shutil.rmtree(old, ignore_errors=True)


def _ensure_legacy(spec: ImageSpec, cdir: Path) -> Path:
    """The cached legacy layout, written now if absent (atomically via rename)."""
    final = cdir / "legacy"
    if not final.is_dir():
        cdir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-legacy-", dir=cdir))
        shutil.rmtree(tmp)
        write_oci_layout(spec, tmp, "legacy")
        _publish(tmp, final)
    return final


def build_and_push(
    registry: Registry,
    names: Sequence[str] = NAMES,
    variants: Sequence[str] = VARIANTS,
    *,
    stats: BuildStats | None = None,
    optimize: dict[str, OptimizeRun] | None = None,
    may_fail: frozenset[str] = frozenset(),
) -> dict[str, str]:
    """Make sure ``registry`` holds every ``name:variant``; return ``{"name:variant": full_ref}``.

    A variant in ``may_fail`` whose build fails is left out of the result and its error kept in
    ``stats.failed`` (the benchmark reports it and runs the rest); any other failure raises.

    Variants missing from the cache are produced by the reference tools (a private containerd is
    started only when a ctr-remote conversion is needed) and then stored in the cache. The
    ``esgz-opt`` variant of an image needs its workload in ``optimize``.
    """
    check_tools()
    optimize = optimize or {}
    unknown = sorted(set(names) - set(SPECS)) + sorted(set(variants) - {*VARIANTS, OPTIMIZED})
    unknown += [f"{n}:{OPTIMIZED} (no workload to optimize for)" for n in names
                if OPTIMIZED in variants and n not in optimize]
    if unknown:
        raise ImageBuildError(f"unknown image names/variants: {unknown}")
    stats = stats if stats is not None else BuildStats()
    t0 = time.monotonic()
    host = registry.host
    prefix = getattr(registry, "prefix_cmd", [])  # a registry inside a network namespace
    refs: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="lazyshim-images-") as tmp_s, contextlib.ExitStack() as stack:
        tmp = Path(tmp_s)
        penv = PrivateEnv(tmp / "containers")
        containerd: Containerd | None = None
        for name in names:
            spec = SPECS[name]()
            cdir = _cache_dir(spec)
            _prune_stale(spec, cdir)
            legacy_cached = (cdir / "legacy").is_dir()
            legacy = _ensure_legacy(spec, cdir)
            # legacy is always pushed: it is the source of every conversion.
            skopeo_copy(f"oci:{legacy}:legacy", f"docker://{host}/{name}:legacy", penv, prefix=prefix)
            (stats.from_cache if legacy_cached else stats.built).append(f"{name}:legacy")
            for variant in variants:
                key = f"{name}:{variant}"
                refs[key] = f"{host}/{name}:{variant}"
                if variant == "legacy":
                    continue
                layout = _layout_dir(cdir, variant, optimize.get(name))
                if layout.is_dir():
                    skopeo_copy(f"oci:{layout}:{variant}", f"docker://{refs[key]}", penv, prefix=prefix)
                    stats.from_cache.append(key)
                    continue
                if variant == "podman-zstdchunked":
                    # podman refuses a runroot path longer than 50 characters: keep it short.
                    pdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lzp-")))
                    try:
                        _podman_zstd_chunked(host, name, pdir, penv, prefix)
                    except ImageBuildError as exc:
                        if variant not in may_fail:
                            raise
                        stats.failed[key] = str(exc)
                        del refs[key]
                        continue
                else:
                    if containerd is None:
                        containerd = Containerd(tmp / "containerd").start()
                        stack.callback(containerd.stop)
                    src = f"{host}/{name}:legacy"
                    containerd.ctr("image", "pull", "--plain-http", "--snapshotter", "native", src, prefix=prefix)
                    if variant == OPTIMIZED:
                        containerd.ctr("image", "optimize", "--oci", *optimize[name].ctr_flags(), src, refs[key],
                                       timeout=900)
                    else:
                        flag = "--estargz" if variant == "esgz" else "--zstdchunked"
                        containerd.ctr("image", "convert", "--oci", flag, src, refs[key])
                    containerd.ctr("image", "push", "--plain-http", refs[key], prefix=prefix)
                # Keep the converted bytes exactly as pushed, for later sessions.
                staging = Path(tempfile.mkdtemp(prefix=f".tmp-{variant}-", dir=cdir))
                shutil.rmtree(staging)
                skopeo_copy(f"docker://{refs[key]}", f"oci:{staging}:{variant}", penv, prefix=prefix)
                _publish(staging, layout)
                stats.built.append(key)
    stats.seconds = time.monotonic() - t0
    return refs


# ---------------------------------------------------------------------------------------------
# Reading back what the registry serves (used by tests and by the report)
# ---------------------------------------------------------------------------------------------


def fetch_manifest(host: str, name: str, ref: str) -> dict:
    """GET an OCI manifest from the plain-HTTP registry."""
    req = urllib.request.Request(
        f"http://{host}/v2/{name}/manifests/{ref}",
        headers={"Accept": f"{MT_MANIFEST}, application/vnd.docker.distribution.manifest.v2+json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def fetch_blob(host: str, name: str, digest: str, byte_range: tuple[int, int] | None = None) -> bytes:
    """GET a blob (optionally an inclusive byte range) from the plain-HTTP registry."""
    headers = {"Range": f"bytes={byte_range[0]}-{byte_range[1]}"} if byte_range else {}
    req = urllib.request.Request(f"http://{host}/v2/{name}/blobs/{digest}", headers=headers)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()


def describe(refs: dict[str, str]) -> Iterator[str]:
    """Human-readable lines: per ref, each layer's media type, size and annotation keys."""
    for key, ref in refs.items():
        host, _, rest = ref.partition("/")
        name, _, tag = rest.rpartition(":")
        manifest = fetch_manifest(host, name, tag)
        sizes = [layer["size"] for layer in manifest["layers"]]
        yield f"{key}: {ref} layers={sizes} total={sum(sizes)}"
        for layer in manifest["layers"]:
            keys = sorted(layer.get("annotations", {}))
            yield f"    {layer['mediaType']} {layer['size']:>9} annotations={keys}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m integration.images [--push HOST:PORT]``: build, push and print the refs.

    Without ``--push`` a private registry is started for the duration of the run (useful to fill
    the cache and to see sizes and annotations).
    """
    p = argparse.ArgumentParser(prog="python -m integration.images", description=main.__doc__)
    p.add_argument("--push", metavar="HOST", help="existing registry (127.0.0.1:PORT) to push to")
    p.add_argument("--names", default=",".join(NAMES))
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args(argv)

    class _Existing(Registry):
        """An already running registry: only its address is known."""

        def __init__(self, host: str) -> None:
            super().__init__()
            self._existing_host = host

        @property
        def host(self) -> str:
            return self._existing_host

    stats = BuildStats()
    with contextlib.ExitStack() as stack:
        reg = _Existing(args.push) if args.push else stack.enter_context(Registry())
        try:
            refs = build_and_push(reg, args.names.split(","), args.variants.split(","), stats=stats)
        except ImageBuildError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"# built {stats.built or '-'}; from cache {stats.from_cache or '-'}; {stats.seconds:.1f}s")
        for line in describe(refs):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
