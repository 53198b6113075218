"""The messages of containerd's snapshots service (api/services/snapshots/v1), built by hand.

Only the wire format matters to containerd: field numbers and types below match containerd
1.6's `snapshots.proto` and `types/mount.proto` exactly.  Building the descriptors here
(rather than generating code with grpcio-tools) keeps the build free of a code generator and
the module free of generated text pinned to one protobuf release.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, empty_pb2, field_mask_pb2, timestamp_pb2
from google.protobuf.message_factory import GetMessageClass

PACKAGE = "containerd.services.snapshots.v1"
SERVICE = f"{PACKAGE}.Snapshots"

# Kind enum values, as containerd numbers them.
UNKNOWN, VIEW, ACTIVE, COMMITTED = 0, 1, 2, 3

_F = descriptor_pb2.FieldDescriptorProto
_STRING, _INT64, _ENUM, _MSG = _F.TYPE_STRING, _F.TYPE_INT64, _F.TYPE_ENUM, _F.TYPE_MESSAGE
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED

# message name -> [(field name, number, type, repeated, type name or "map")]
_MESSAGES: dict[str, list[tuple[str, int, int, bool, str]]] = {
    "Mount": [("type", 1, _STRING, False, ""), ("source", 2, _STRING, False, ""),
              ("target", 3, _STRING, False, ""), ("options", 4, _STRING, True, "")],
    "PrepareSnapshotRequest": [("snapshotter", 1, _STRING, False, ""), ("key", 2, _STRING, False, ""),
                               ("parent", 3, _STRING, False, ""), ("labels", 4, _MSG, True, "map")],
    "PrepareSnapshotResponse": [("mounts", 1, _MSG, True, ".containerd.types.Mount")],
    "ViewSnapshotRequest": [("snapshotter", 1, _STRING, False, ""), ("key", 2, _STRING, False, ""),
                            ("parent", 3, _STRING, False, ""), ("labels", 4, _MSG, True, "map")],
    "ViewSnapshotResponse": [("mounts", 1, _MSG, True, ".containerd.types.Mount")],
    "MountsRequest": [("snapshotter", 1, _STRING, False, ""), ("key", 2, _STRING, False, "")],
    "MountsResponse": [("mounts", 1, _MSG, True, ".containerd.types.Mount")],
    "RemoveSnapshotRequest": [("snapshotter", 1, _STRING, False, ""), ("key", 2, _STRING, False, "")],
    "CommitSnapshotRequest": [("snapshotter", 1, _STRING, False, ""), ("name", 2, _STRING, False, ""),
                              ("key", 3, _STRING, False, ""), ("labels", 4, _MSG, True, "map")],
    "StatSnapshotRequest": [("snapshotter", 1, _STRING, False, ""), ("key", 2, _STRING, False, "")],
    "Info": [("name", 1, _STRING, False, ""), ("parent", 2, _STRING, False, ""),
             ("kind", 3, _ENUM, False, f".{PACKAGE}.Kind"),
             ("created_at", 4, _MSG, False, ".google.protobuf.Timestamp"),
             ("updated_at", 5, _MSG, False, ".google.protobuf.Timestamp"), ("labels", 6, _MSG, True, "map")],
    "StatSnapshotResponse": [("info", 1, _MSG, False, f".{PACKAGE}.Info")],
    "UpdateSnapshotRequest": [("snapshotter", 1, _STRING, False, ""), ("info", 2, _MSG, False, f".{PACKAGE}.Info"),
                              ("update_mask", 3, _MSG, False, ".google.protobuf.FieldMask")],
    "UpdateSnapshotResponse": [("info", 1, _MSG, False, f".{PACKAGE}.Info")],
    "ListSnapshotsRequest": [("snapshotter", 1, _STRING, False, ""), ("filters", 2, _STRING, True, "")],
    "ListSnapshotsResponse": [("info", 1, _MSG, True, f".{PACKAGE}.Info")],
    "UsageRequest": [("snapshotter", 1, _STRING, False, ""), ("key", 2, _STRING, False, "")],
    "UsageResponse": [("size", 1, _INT64, False, ""), ("inodes", 2, _INT64, False, "")],
    "CleanupRequest": [("snapshotter", 1, _STRING, False, "")],
}

# rpc name -> (request, response); List streams its responses.
METHODS: dict[str, tuple[str, str]] = {
    "Prepare": ("PrepareSnapshotRequest", "PrepareSnapshotResponse"),
    "View": ("ViewSnapshotRequest", "ViewSnapshotResponse"),
    "Mounts": ("MountsRequest", "MountsResponse"),
    "Commit": ("CommitSnapshotRequest", "Empty"),
    "Remove": ("RemoveSnapshotRequest", "Empty"),
    "Stat": ("StatSnapshotRequest", "StatSnapshotResponse"),
    "Update": ("UpdateSnapshotRequest", "UpdateSnapshotResponse"),
    "List": ("ListSnapshotsRequest", "ListSnapshotsResponse"),
    "Usage": ("UsageRequest", "UsageResponse"),
    "Cleanup": ("CleanupRequest", "Empty"),
}
STREAMING = frozenset({"List"})


def _message(name: str, fields: list[tuple[str, int, int, bool, str]]) -> descriptor_pb2.DescriptorProto:
    msg = descriptor_pb2.DescriptorProto(name=name)
    for fname, number, ftype, repeated, type_name in fields:
        f = msg.field.add(name=fname, number=number, type=ftype, label=_REP if repeated else _OPT)
        if type_name == "map":  # map<string, string>: a repeated nested entry message
            entry = msg.nested_type.add(name=f"{fname.capitalize()}Entry")
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=_STRING, label=_OPT)
            entry.field.add(name="value", number=2, type=_STRING, label=_OPT)
            f.type_name = entry.name
        elif type_name:
            f.type_name = type_name
    return msg


def _build() -> dict[str, type]:
    pool = descriptor_pool.DescriptorPool()
    for wkt in (empty_pb2, field_mask_pb2, timestamp_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        wkt.DESCRIPTOR.CopyToProto(fdp)
        pool.Add(fdp)
    types = descriptor_pb2.FileDescriptorProto(name="lazyshim/containerd/types/mount.proto",
                                               package="containerd.types", syntax="proto3")
    types.message_type.append(_message("Mount", _MESSAGES["Mount"]))
    pool.Add(types)
    svc = descriptor_pb2.FileDescriptorProto(
        name="lazyshim/containerd/snapshots.proto", package=PACKAGE, syntax="proto3",
        dependency=[types.name, "google/protobuf/empty.proto", "google/protobuf/field_mask.proto",
                    "google/protobuf/timestamp.proto"])
    kind = svc.enum_type.add(name="Kind")
    for vname, number in (("UNKNOWN", UNKNOWN), ("VIEW", VIEW), ("ACTIVE", ACTIVE), ("COMMITTED", COMMITTED)):
        kind.value.add(name=vname, number=number)
    for name, fields in _MESSAGES.items():
        if name != "Mount":
            svc.message_type.append(_message(name, fields))
    pool.Add(svc)
    out = {name: GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
           for name in _MESSAGES if name != "Mount"}
    out["Mount"] = GetMessageClass(pool.FindMessageTypeByName("containerd.types.Mount"))
    out["Empty"] = GetMessageClass(pool.FindMessageTypeByName("google.protobuf.Empty"))
    return out


MESSAGES = _build()
Mount = MESSAGES["Mount"]
Info = MESSAGES["Info"]
