"""containerd's snapshots service over gRPC: requests in, `Snapshots` calls, replies out.

The one place that knows both the wire messages and the bookkeeping.  A Prepare whose
labels name a remote layer (see `lazy.layer_source`) makes the layer lazy in the store,
records it as committed under containerd's target chain id and answers AlreadyExists, as
stargz-snapshotter does: containerd then finds the committed snapshot and downloads nothing.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Protocol

import grpc

from ..errors import LazyshimError
from . import proto
from .lazy import EXPECTED, LayerSource, layer_source
from .snapshots import ACTIVE, COMMITTED, VIEW, Snapshot, SnapshotError, Snapshots

_CODES = {
    "not_found": grpc.StatusCode.NOT_FOUND,
    "already_exists": grpc.StatusCode.ALREADY_EXISTS,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
}
_KINDS = {VIEW: proto.VIEW, ACTIVE: proto.ACTIVE, COMMITTED: proto.COMMITTED}
LIST_BATCH = 100
USER_FILES = ("/etc/passwd", "/etc/group")


class Layers(Protocol):
    """What the service needs of the layer store (`lazy.StoreLayers`; a fake in unit tests)."""

    def ensure(self, src: LayerSource) -> str | None: ...
    def lowerdir(self, digest: str) -> Path: ...
    def fill(self, digests: list[str]) -> None: ...
    def fill_files(self, digests: list[str], paths: tuple[str, ...]) -> None: ...
    def release_unused(self, keep: set[str]) -> list[str]: ...


class _Gate:
    """Many Prepares at once, or one Cleanup: a layer built for a Prepare but not yet recorded
    must not look unused to a Cleanup running beside it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class SnapshotService:
    def __init__(self, snaps: Snapshots, layers: Layers) -> None:
        self.snaps = snaps
        self.layers = layers
        self._gate = _Gate()

    # Each handler takes a request message and returns a reply message (List: an iterator).

    def Prepare(self, req):  # noqa: N802 - gRPC method names
        labels = dict(req.labels)
        src = layer_source(labels)
        if src is not None and not self.snaps.exists(req.key):
            if self.snaps.exists(src.target):
                raise SnapshotError("already_exists", f"target snapshot {src.target!r} already exists")
            with self._gate.shared():
                digest = self.layers.ensure(src)
                if digest is not None:
                    try:
                        self.snaps.add_lazy(src.target, req.parent, labels, digest)
                    except SnapshotError as e:
                        if e.code != "already_exists":
                            raise
            if digest is not None:
                raise SnapshotError("already_exists", f"target snapshot {src.target!r} already exists")
        mounts = self.snaps.create(ACTIVE, req.key, req.parent, labels)
        if req.parent:
            self._fill_user_files(req.key)
        return proto.MESSAGES["PrepareSnapshotResponse"](mounts=_mounts(mounts))

    def _fill_user_files(self, key: str) -> None:
        """containerd resolves a container's user (CRI `run_as_username`, an image `User` name,
        supplementary groups) by reading these files from a temporary mount of the new snapshot,
        which no supervisor watches: they must be complete before it looks.  Two small files,
        filled once per layer; if the registry fails, containerd reports the lookup itself."""
        try:
            self.layers.fill_files(self.snaps.lazy_layers_below(key), USER_FILES)
        except EXPECTED as e:
            print(f"lazyshim: snapshotter: {key[:60]}: {e}", file=sys.stderr)

    def View(self, req):  # noqa: N802
        mounts = self.snaps.create(VIEW, req.key, req.parent, dict(req.labels))
        # A view's readers are not watched by a supervisor: give them complete files only.
        try:
            self.layers.fill(self.snaps.lazy_layers_below(req.key))
        except BaseException:
            self.snaps.remove(req.key)
            raise
        return proto.MESSAGES["ViewSnapshotResponse"](mounts=_mounts(mounts))

    def Mounts(self, req):  # noqa: N802
        snap = self.snaps.get(req.key)
        if snap.kind != ACTIVE:  # read-only mounts have no supervisor: complete files only
            self.layers.fill(self.snaps.lazy_layers_below(req.key))
        return proto.MESSAGES["MountsResponse"](mounts=_mounts(self.snaps.mounts(req.key)))

    def Commit(self, req):  # noqa: N802
        self.snaps.commit(req.name, req.key, dict(req.labels))
        return proto.MESSAGES["Empty"]()

    def Remove(self, req):  # noqa: N802
        self.snaps.remove(req.key)
        return proto.MESSAGES["Empty"]()

    def Stat(self, req):  # noqa: N802
        return proto.MESSAGES["StatSnapshotResponse"](info=_info(req.key, self.snaps.get(req.key)))

    def Update(self, req):  # noqa: N802
        snap = self.snaps.update_labels(req.info.name, dict(req.info.labels), list(req.update_mask.paths))
        return proto.MESSAGES["UpdateSnapshotResponse"](info=_info(req.info.name, snap))

    def List(self, req) -> Iterator:  # noqa: N802
        # Filters are not applied: containerd checks what it needs of each answer itself.
        batch = []
        for key, snap in self.snaps.walk():
            batch.append(_info(key, snap))
            if len(batch) == LIST_BATCH:
                yield proto.MESSAGES["ListSnapshotsResponse"](info=batch)
                batch = []
        if batch:
            yield proto.MESSAGES["ListSnapshotsResponse"](info=batch)

    def Usage(self, req):  # noqa: N802
        size, inodes = self.snaps.usage(req.key)
        return proto.MESSAGES["UsageResponse"](size=size, inodes=inodes)

    def Cleanup(self, req):  # noqa: N802
        self.snaps.cleanup()
        with self._gate.exclusive():
            self.layers.release_unused(self.snaps.layers_in_use())
        return proto.MESSAGES["Empty"]()


def _mounts(mounts) -> list:
    return [proto.Mount(type=m.type, source=m.source, options=list(m.options)) for m in mounts]


def _info(key: str, snap: Snapshot):
    info = proto.Info(name=key, parent=snap.parent, kind=_KINDS[snap.kind], labels=snap.labels)
    info.created_at.FromNanoseconds(int(snap.created * 1e9))
    info.updated_at.FromNanoseconds(int(snap.updated * 1e9))
    return info


def _unary(fn: Callable):
    def handler(req, context):
        try:
            return fn(req)
        except SnapshotError as e:
            context.abort(_CODES[e.code], str(e))
        except EXPECTED as e:
            print(f"lazyshim: snapshotter: {fn.__name__}: {e}", file=sys.stderr)
            context.abort(grpc.StatusCode.INTERNAL, str(e))
    return handler


def _stream(fn: Callable):
    def handler(req, context):
        try:
            yield from fn(req)
        except EXPECTED as e:
            context.abort(grpc.StatusCode.INTERNAL, str(e))
    return handler


def generic_handler(service: SnapshotService) -> grpc.GenericRpcHandler:
    handlers = {}
    for name, (req_name, resp_name) in proto.METHODS.items():
        req_t, resp_t = proto.MESSAGES[req_name], proto.MESSAGES[resp_name]
        fn = getattr(service, name)
        if name in proto.STREAMING:
            handlers[name] = grpc.unary_stream_rpc_method_handler(
                _stream(fn), request_deserializer=req_t.FromString, response_serializer=resp_t.SerializeToString)
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                _unary(fn), request_deserializer=req_t.FromString, response_serializer=resp_t.SerializeToString)
    return grpc.method_handlers_generic_handler(proto.SERVICE, handlers)


def make_server(service: SnapshotService, address: str, workers: int = 8) -> grpc.Server:
    """A gRPC server for `service` on the unix socket `address` (not started)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((generic_handler(service),))
    if server.add_insecure_port(f"unix:{address}") == 0:
        raise LazyshimError(f"cannot listen on {address}")
    return server
