"""A small client of the kubelet's CRI API (`runtime.v1`), for driving containerd as a kubelet does.

Only the RuntimeService and ImageService calls and fields the tests use are described, by hand,
the way `shim/snapshotter/proto.py` builds containerd's snapshot messages: field numbers and
wire types match kubernetes/cri-api `pkg/apis/runtime/v1/api.proto` exactly (unknown fields in
replies are kept and ignored by protobuf).  `KeyValue.value` is `string` here, as containerd 1.6
declares it; cri-api later made it `bytes`, which is the same wire type.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message_factory import GetMessageClass

PACKAGE = "runtime.v1"

# NamespaceMode and ContainerState, as api.proto numbers them.
POD, CONTAINER, NODE, TARGET = 0, 1, 2, 3
CONTAINER_CREATED, CONTAINER_RUNNING, CONTAINER_EXITED, CONTAINER_UNKNOWN = 0, 1, 2, 3
SANDBOX_READY, SANDBOX_NOTREADY = 0, 1

_F = descriptor_pb2.FieldDescriptorProto
_STR, _BOOL, _I32, _I64, _U32, _U64 = _F.TYPE_STRING, _F.TYPE_BOOL, _F.TYPE_INT32, _F.TYPE_INT64, \
    _F.TYPE_UINT32, _F.TYPE_UINT64
_ENUM, _MSG = _F.TYPE_ENUM, _F.TYPE_MESSAGE
_OPT, _REP = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED

_ENUMS = {
    "NamespaceMode": [("POD", POD), ("CONTAINER", CONTAINER), ("NODE", NODE), ("TARGET", TARGET)],
    "ContainerState": [("CONTAINER_CREATED", CONTAINER_CREATED), ("CONTAINER_RUNNING", CONTAINER_RUNNING),
                       ("CONTAINER_EXITED", CONTAINER_EXITED), ("CONTAINER_UNKNOWN", CONTAINER_UNKNOWN)],
    "PodSandboxState": [("SANDBOX_READY", SANDBOX_READY), ("SANDBOX_NOTREADY", SANDBOX_NOTREADY)],
}

# message -> [(field, number, type, repeated, type name: a message/enum of this file, or "map")]
_MESSAGES: dict[str, list[tuple[str, int, int, bool, str]]] = {
    "VersionRequest": [("version", 1, _STR, False, "")],
    "VersionResponse": [("version", 1, _STR, False, ""), ("runtime_name", 2, _STR, False, ""),
                        ("runtime_version", 3, _STR, False, ""), ("runtime_api_version", 4, _STR, False, "")],
    "Mount": [("container_path", 1, _STR, False, ""), ("host_path", 2, _STR, False, ""),
              ("readonly", 3, _BOOL, False, "")],
    "NamespaceOption": [("network", 1, _ENUM, False, "NamespaceMode"), ("pid", 2, _ENUM, False, "NamespaceMode"),
                        ("ipc", 3, _ENUM, False, "NamespaceMode"), ("target_id", 4, _STR, False, "")],
    "LinuxSandboxSecurityContext": [("namespace_options", 1, _MSG, False, "NamespaceOption"),
                                    ("privileged", 6, _BOOL, False, "")],
    "LinuxPodSandboxConfig": [("cgroup_parent", 1, _STR, False, ""),
                              ("security_context", 2, _MSG, False, "LinuxSandboxSecurityContext")],
    "PodSandboxMetadata": [("name", 1, _STR, False, ""), ("uid", 2, _STR, False, ""),
                           ("namespace", 3, _STR, False, ""), ("attempt", 4, _U32, False, "")],
    "PodSandboxConfig": [("metadata", 1, _MSG, False, "PodSandboxMetadata"), ("hostname", 2, _STR, False, ""),
                         ("log_directory", 3, _STR, False, ""), ("labels", 6, _MSG, True, "map"),
                         ("annotations", 7, _MSG, True, "map"), ("linux", 8, _MSG, False, "LinuxPodSandboxConfig")],
    "RunPodSandboxRequest": [("config", 1, _MSG, False, "PodSandboxConfig"), ("runtime_handler", 2, _STR, False, "")],
    "RunPodSandboxResponse": [("pod_sandbox_id", 1, _STR, False, "")],
    "StopPodSandboxRequest": [("pod_sandbox_id", 1, _STR, False, "")],
    "StopPodSandboxResponse": [],
    "RemovePodSandboxRequest": [("pod_sandbox_id", 1, _STR, False, "")],
    "RemovePodSandboxResponse": [],
    "PodSandboxStatusRequest": [("pod_sandbox_id", 1, _STR, False, ""), ("verbose", 2, _BOOL, False, "")],
    "PodSandboxStatus": [("id", 1, _STR, False, ""), ("metadata", 2, _MSG, False, "PodSandboxMetadata"),
                         ("state", 3, _ENUM, False, "PodSandboxState"), ("created_at", 4, _I64, False, ""),
                         ("runtime_handler", 9, _STR, False, "")],
    "PodSandboxStatusResponse": [("status", 1, _MSG, False, "PodSandboxStatus"), ("info", 2, _MSG, True, "map")],
    "ImageSpec": [("image", 1, _STR, False, ""), ("annotations", 2, _MSG, True, "map")],
    "KeyValue": [("key", 1, _STR, False, ""), ("value", 2, _STR, False, "")],
    "ContainerMetadata": [("name", 1, _STR, False, ""), ("attempt", 2, _U32, False, "")],
    "LinuxContainerSecurityContext": [("privileged", 2, _BOOL, False, ""),
                                      ("namespace_options", 3, _MSG, False, "NamespaceOption"),
                                      ("run_as_username", 6, _STR, False, "")],
    "LinuxContainerConfig": [("security_context", 2, _MSG, False, "LinuxContainerSecurityContext")],
    "ContainerConfig": [("metadata", 1, _MSG, False, "ContainerMetadata"), ("image", 2, _MSG, False, "ImageSpec"),
                        ("command", 3, _STR, True, ""), ("args", 4, _STR, True, ""),
                        ("working_dir", 5, _STR, False, ""), ("envs", 6, _MSG, True, "KeyValue"),
                        ("mounts", 7, _MSG, True, "Mount"), ("labels", 9, _MSG, True, "map"),
                        ("annotations", 10, _MSG, True, "map"), ("log_path", 11, _STR, False, ""),
                        ("linux", 15, _MSG, False, "LinuxContainerConfig")],
    "CreateContainerRequest": [("pod_sandbox_id", 1, _STR, False, ""), ("config", 2, _MSG, False, "ContainerConfig"),
                               ("sandbox_config", 3, _MSG, False, "PodSandboxConfig")],
    "CreateContainerResponse": [("container_id", 1, _STR, False, "")],
    "StartContainerRequest": [("container_id", 1, _STR, False, "")],
    "StartContainerResponse": [],
    "StopContainerRequest": [("container_id", 1, _STR, False, ""), ("timeout", 2, _I64, False, "")],
    "StopContainerResponse": [],
    "RemoveContainerRequest": [("container_id", 1, _STR, False, "")],
    "RemoveContainerResponse": [],
    "ContainerStatusRequest": [("container_id", 1, _STR, False, ""), ("verbose", 2, _BOOL, False, "")],
    "ContainerStatus": [("id", 1, _STR, False, ""), ("metadata", 2, _MSG, False, "ContainerMetadata"),
                        ("state", 3, _ENUM, False, "ContainerState"), ("created_at", 4, _I64, False, ""),
                        ("started_at", 5, _I64, False, ""), ("finished_at", 6, _I64, False, ""),
                        ("exit_code", 7, _I32, False, ""), ("image", 8, _MSG, False, "ImageSpec"),
                        ("image_ref", 9, _STR, False, ""), ("reason", 10, _STR, False, ""),
                        ("message", 11, _STR, False, ""), ("log_path", 15, _STR, False, "")],
    "ContainerStatusResponse": [("status", 1, _MSG, False, "ContainerStatus"), ("info", 2, _MSG, True, "map")],
    "Image": [("id", 1, _STR, False, ""), ("repo_tags", 2, _STR, True, ""), ("repo_digests", 3, _STR, True, ""),
              ("size", 4, _U64, False, "")],
    "ImageStatusRequest": [("image", 1, _MSG, False, "ImageSpec"), ("verbose", 2, _BOOL, False, "")],
    "ImageStatusResponse": [("image", 1, _MSG, False, "Image"), ("info", 2, _MSG, True, "map")],
    "PullImageRequest": [("image", 1, _MSG, False, "ImageSpec"),
                         ("sandbox_config", 3, _MSG, False, "PodSandboxConfig")],
    "PullImageResponse": [("image_ref", 1, _STR, False, "")],
    "RemoveImageRequest": [("image", 1, _MSG, False, "ImageSpec")],
    "RemoveImageResponse": [],
}

# service -> rpc -> request message (the reply is the same name with Response).
SERVICES: dict[str, list[str]] = {
    "RuntimeService": ["Version", "RunPodSandbox", "StopPodSandbox", "RemovePodSandbox", "PodSandboxStatus",
                       "CreateContainer", "StartContainer", "StopContainer", "RemoveContainer", "ContainerStatus"],
    "ImageService": ["ImageStatus", "PullImage", "RemoveImage"],
}


def _message(name: str, fields: list[tuple[str, int, int, bool, str]]) -> descriptor_pb2.DescriptorProto:
    msg = descriptor_pb2.DescriptorProto(name=name)
    for fname, number, ftype, repeated, type_name in fields:
        f = msg.field.add(name=fname, number=number, type=ftype, label=_REP if repeated else _OPT)
        if type_name == "map":  # map<string, string>: a repeated nested entry message
            entry = msg.nested_type.add(name="".join(p.capitalize() for p in fname.split("_")) + "Entry")
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=_STR, label=_OPT)
            entry.field.add(name="value", number=2, type=_STR, label=_OPT)
            f.type_name = entry.name
        elif type_name:
            f.type_name = f".{PACKAGE}.{type_name}"
    return msg


def _build() -> dict[str, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(name="lazyshim/integration/cri/api.proto", package=PACKAGE,
                                             syntax="proto3")
    for ename, values in _ENUMS.items():
        enum = fdp.enum_type.add(name=ename)
        for vname, number in values:
            enum.value.add(name=vname, number=number)
    for name, fields in _MESSAGES.items():
        fdp.message_type.append(_message(name, fields))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {name: GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}")) for name in _MESSAGES}


M = _build()


class CRIError(RuntimeError):
    """A CRI call failed: the method, the gRPC status and containerd's message."""


class CRIClient:
    """`client.call("PullImage", image={"image": ref})`: one unary CRI call, keyword fields
    as protobuf accepts them (nested dicts become messages); returns the reply message."""

    def __init__(self, socket_path: str, timeout: float = 300) -> None:
        self.channel = grpc.insecure_channel(f"unix:{socket_path}")
        self.timeout = timeout
        self._stubs: dict[str, Any] = {}
        for service, methods in SERVICES.items():
            for method in methods:
                self._stubs[method] = self.channel.unary_unary(
                    f"/{PACKAGE}.{service}/{method}", request_serializer=M[f"{method}Request"].SerializeToString,
                    response_deserializer=M[f"{method}Response"].FromString)

    def call(self, method: str, timeout: float | None = None, **fields: Any) -> Any:
        try:
            return self._stubs[method](M[f"{method}Request"](**fields), timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise CRIError(f"{method}: {e.code().name}: {e.details()}") from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CRIClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_log(text: str) -> list[tuple[str, str]]:
    """(stream, line) pairs of a CRI container log (`TIMESTAMP STREAM TAG CONTENT` lines; a
    `P` tag marks a partial line the next record continues)."""
    out: list[tuple[str, str]] = []
    pending: dict[str, str] = {}
    for record in text.splitlines():
        parts = record.split(" ", 3)
        if len(parts) < 3:
            raise ValueError(f"not a CRI log line: {record[:80]!r}")
        _, stream, tag = parts[:3]
        content = parts[3] if len(parts) == 4 else ""
        if tag == "P":
            pending[stream] = pending.get(stream, "") + content
        elif tag == "F":
            out.append((stream, pending.pop(stream, "") + content))
        else:
            raise ValueError(f"bad CRI log tag {tag!r} in {record[:80]!r}")
    return out
