"""Snapshot bookkeeping and the gRPC service, without root: a real grpc server on a unix
socket in a temp dir, a fake layer store, and containerd's wire messages built by hand."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from shim.errors import LazyshimError
from shim.snapshotter import proto
from shim.snapshotter.lazy import CRI_DIGEST, CRI_REF, STARGZ_DIGEST, STARGZ_REF, TARGET_REF, layer_source
from shim.snapshotter.service import SnapshotService, make_server
from shim.snapshotter.snapshots import ACTIVE, COMMITTED, VIEW, SnapshotError, Snapshots

LAYER = "sha256:" + "ab" * 32


class FakeLayers:
    """A layer store whose every layer with labels is lazy (or none, with lazy=False)."""

    def __init__(self, root: Path, lazy: bool = True) -> None:
        self.root, self.lazy = root, lazy
        self.ensured: list[str] = []
        self.filled: list[list[str]] = []
        self.files_filled: list[tuple[list[str], tuple[str, ...]]] = []
        self.released: list[str] = []
        self.layers: set[str] = set()

    def ensure(self, src):
        self.ensured.append(src.layer_digest)
        if not self.lazy:
            return None
        self.lowerdir(src.layer_digest).mkdir(parents=True, exist_ok=True)
        self.layers.add(src.layer_digest)
        return src.layer_digest

    def lowerdir(self, digest: str) -> Path:
        return self.root / digest.replace(":", "-") / "tree"

    def fill(self, digests: list[str]) -> None:
        self.filled.append(list(digests))

    def fill_files(self, digests: list[str], paths: tuple[str, ...]) -> None:
        if digests:
            self.files_filled.append((list(digests), paths))

    def release_unused(self, keep: set[str]) -> list[str]:
        gone = sorted(self.layers - keep)
        self.layers -= set(gone)
        self.released += gone
        return gone


@pytest.fixture
def layers(tmp_path: Path) -> FakeLayers:
    return FakeLayers(tmp_path / "store")


@pytest.fixture
def snaps(tmp_path: Path, layers: FakeLayers):
    s = Snapshots(tmp_path / "snap", layers.lowerdir)
    yield s
    s.close()


def _opts(mounts) -> dict[str, str]:
    return dict(o.split("=", 1) for o in mounts[0].options if "=" in o)


def test_a_chain_mounts_as_overlay_with_nearest_parent_first(snaps: Snapshots, tmp_path: Path) -> None:
    m = snaps.create(ACTIVE, "a", "", {})
    assert m[0].type == "bind" and m[0].options == ("rw", "rbind")
    Path(m[0].source, "base.txt").write_text("base")
    snaps.commit("c1", "a", {"x": "y"})
    snaps.create(ACTIVE, "b", "c1", {})
    snaps.commit("c2", "b", {})
    m = snaps.create(ACTIVE, "ctr", "c2", {})
    assert m[0].type == "overlay"
    opts = _opts(m)
    root = tmp_path / "snap" / "snapshots"
    assert opts["lowerdir"] == f"{root / snaps.get('c2').id / 'fs'}:{root / snaps.get('c1').id / 'fs'}"
    assert opts["upperdir"] == str(root / snaps.get("ctr").id / "fs")
    assert Path(opts["workdir"]).is_dir()
    assert snaps.get("c1").kind == COMMITTED and snaps.get("c1").labels == {"x": "y"}
    assert snaps.usage("c1")[1] == 1
    assert not snaps.exists("a")


def test_a_view_of_one_layer_is_a_read_only_bind(snaps: Snapshots, layers: FakeLayers) -> None:
    snaps.add_lazy("lazy", "", {}, LAYER)
    m = snaps.create(VIEW, "v", "lazy", {})
    assert m[0].type == "bind" and m[0].source == str(layers.lowerdir(LAYER)) and m[0].options == ("ro", "rbind")
    assert snaps.get("v").kind == VIEW
    assert snaps.lazy_layers_below("v") == [LAYER]


def test_lazy_parents_are_lower_dirs_of_the_store(snaps: Snapshots, layers: FakeLayers) -> None:
    snaps.add_lazy("l1", "", {}, LAYER)
    other = "sha256:" + "cd" * 32
    snaps.add_lazy("l2", "l1", {}, other)
    opts = _opts(snaps.create(ACTIVE, "ctr", "l2", {}))
    assert opts["lowerdir"] == f"{layers.lowerdir(other)}:{layers.lowerdir(LAYER)}"


def test_errors_carry_containerd_codes(snaps: Snapshots) -> None:
    snaps.create(ACTIVE, "a", "", {})
    with pytest.raises(SnapshotError) as e:
        snaps.create(ACTIVE, "a", "", {})
    assert e.value.code == "already_exists"
    with pytest.raises(SnapshotError) as e:
        snaps.create(ACTIVE, "b", "nope", {})
    assert e.value.code == "not_found"
    with pytest.raises(SnapshotError) as e:
        snaps.create(ACTIVE, "b", "a", {})  # an active snapshot is no parent
    assert e.value.code == "invalid_argument"
    snaps.commit("c", "a", {})
    snaps.create(ACTIVE, "child", "c", {})
    with pytest.raises(SnapshotError) as e:
        snaps.remove("c")
    assert e.value.code == "failed_precondition"
    with pytest.raises(SnapshotError) as e:
        snaps.commit("c2", "c", {})
    assert e.value.code == "failed_precondition"
    with pytest.raises(SnapshotError) as e:
        snaps.create(ACTIVE, "", "", {})
    assert e.value.code == "invalid_argument"
    with pytest.raises(SnapshotError) as e:
        snaps.create(ACTIVE, "big", "", {"k": "v" * (1 << 17)})
    assert e.value.code == "invalid_argument"


def test_state_survives_a_restart(tmp_path: Path, layers: FakeLayers) -> None:
    s = Snapshots(tmp_path / "snap", layers.lowerdir)
    s.create(ACTIVE, "a", "", {"k": "v"})
    s.commit("c", "a", {})
    s.add_lazy("l", "c", {}, LAYER)
    s.create(ACTIVE, "ctr", "l", {})
    s.close()
    s = Snapshots(tmp_path / "snap", layers.lowerdir)
    assert {k: v.kind for k, v in s.walk()} == {"c": COMMITTED, "l": COMMITTED, "ctr": ACTIVE}
    assert s.get("l").layer == LAYER
    s.close()


def test_one_root_has_one_server(tmp_path: Path, snaps: Snapshots, layers: FakeLayers) -> None:
    with pytest.raises(LazyshimError, match="in use"):
        Snapshots(tmp_path / "snap", layers.lowerdir)


@pytest.mark.parametrize("record", [{"bogus": 1}, {"id": "../../victim", "kind": "active"}, {"id": 3}])
def test_a_damaged_state_file_is_a_one_line_error(tmp_path: Path, layers: FakeLayers, record: dict) -> None:
    (tmp_path / "snap").mkdir()
    (tmp_path / "snap" / "state.json").write_text(json.dumps({"next": 1, "snapshots": {"a": record}}))
    with pytest.raises(LazyshimError, match="damaged"):
        Snapshots(tmp_path / "snap", layers.lowerdir)


def test_remove_and_cleanup_leave_only_what_is_recorded(snaps: Snapshots, tmp_path: Path) -> None:
    snaps.create(ACTIVE, "a", "", {})
    snaps.create(ACTIVE, "b", "", {})
    (tmp_path / "snap" / "snapshots" / "99").mkdir()  # left by a crash
    snaps.remove("a")
    assert snaps.cleanup() == ["99"]
    assert [p.name for p in (tmp_path / "snap" / "snapshots").iterdir()] == [snaps.get("b").id]
    snaps.add_lazy("l", "", {}, LAYER)
    snaps.add_lazy("l2", "", {}, LAYER)
    snaps.remove("l")
    assert snaps.layers_in_use() == {LAYER}  # l2 still uses it
    snaps.remove("l2")
    assert snaps.layers_in_use() == set()


def test_labels_update_as_containerd_does(snaps: Snapshots) -> None:
    snaps.create(ACTIVE, "a", "", {"a": "1", "b": "2"})
    assert snaps.update_labels("a", {"c": "3"}, ["labels.c", "labels.a"]).labels == {"b": "2", "c": "3"}
    assert snaps.update_labels("a", {"z": "9"}, []).labels == {"z": "9"}
    with pytest.raises(SnapshotError):
        snaps.update_labels("a", {}, ["parent"])


def test_label_sets_that_name_a_remote_layer() -> None:
    assert layer_source({TARGET_REF: "t", STARGZ_REF: "r", STARGZ_DIGEST: LAYER}).image_ref == "r"
    src = layer_source({TARGET_REF: "t", CRI_REF: "r", CRI_DIGEST: LAYER})
    assert (src.target, src.layer_digest, src.manifest_digest) == ("t", LAYER, None)
    assert layer_source({STARGZ_REF: "r", STARGZ_DIGEST: LAYER}) is None  # no target: not an unpack
    assert layer_source({TARGET_REF: "t"}) is None


# ---------------------------------------------------------------------- over gRPC


class Client:
    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel

    def call(self, method: str, **fields):
        req_t, resp_t = (proto.MESSAGES[n] for n in proto.METHODS[method])
        path = f"/{proto.SERVICE}/{method}"
        if method in proto.STREAMING:
            rpc = self.channel.unary_stream(path, request_serializer=req_t.SerializeToString,
                                            response_deserializer=resp_t.FromString)
            return list(rpc(req_t(**fields), timeout=30))
        rpc = self.channel.unary_unary(path, request_serializer=req_t.SerializeToString,
                                       response_deserializer=resp_t.FromString)
        return rpc(req_t(**fields), timeout=30)


@pytest.fixture
def client(tmp_path: Path, snaps: Snapshots, layers: FakeLayers):
    sock = tmp_path / "s.sock"
    server = make_server(SnapshotService(snaps, layers), str(sock), workers=2)
    server.start()
    channel = grpc.insecure_channel(f"unix:{sock}")
    yield Client(channel)
    channel.close()
    server.stop(None)


def _code(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()


def test_a_labelled_prepare_commits_the_target_and_says_already_exists(client: Client, layers: FakeLayers) -> None:
    labels = {TARGET_REF: "chain1", STARGZ_REF: "reg/img:tag", STARGZ_DIGEST: LAYER}
    with pytest.raises(grpc.RpcError) as e:
        client.call("Prepare", key="ns/1/extract-1", parent="", labels=labels)
    assert _code(e) == grpc.StatusCode.ALREADY_EXISTS
    info = client.call("Stat", key="chain1").info
    assert info.kind == proto.COMMITTED and info.labels[TARGET_REF] == "chain1" and info.parent == ""
    assert info.created_at.seconds > 0
    with pytest.raises(grpc.RpcError) as e:  # the same layer again (another namespace): no second build
        client.call("Prepare", key="ns2/5/extract-2", parent="", labels=labels)
    assert _code(e) == grpc.StatusCode.ALREADY_EXISTS
    assert layers.ensured == [LAYER]
    with pytest.raises(grpc.RpcError) as e:
        client.call("Stat", key="ns/1/extract-1")
    assert _code(e) == grpc.StatusCode.NOT_FOUND
    mounts = client.call("Prepare", key="ctr", parent="chain1").mounts
    assert mounts[0].type == "overlay" and f"lowerdir={layers.lowerdir(LAYER)}" in mounts[0].options
    assert client.call("Mounts", key="ctr").mounts == mounts
    assert layers.filled == []  # an active snapshot's reader is the container, under its supervisor
    # ... but containerd itself reads the user files of a new container snapshot
    assert layers.files_filled == [([LAYER], ("/etc/passwd", "/etc/group"))]
    assert client.call("Mounts", key="chain1").mounts[0].type == "bind"
    assert layers.filled == [[LAYER]]
    layers.filled.clear()
    view = client.call("View", key="v", parent="chain1").mounts
    assert view[0].type == "bind" and "ro" in view[0].options
    assert layers.filled == [[LAYER]]  # a view gets complete files


def test_a_layer_without_index_is_prepared_for_unpacking(tmp_path: Path, snaps: Snapshots) -> None:
    layers = FakeLayers(tmp_path / "store", lazy=False)
    sock = tmp_path / "n.sock"
    server = make_server(SnapshotService(snaps, layers), str(sock), workers=2)
    server.start()
    try:
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            c = Client(ch)
            labels = {TARGET_REF: "chain1", STARGZ_REF: "reg/img:tag", STARGZ_DIGEST: LAYER}
            mounts = c.call("Prepare", key="extract", parent="", labels=labels).mounts
            assert mounts[0].type == "bind" and "rw" in mounts[0].options
            c.call("Commit", name="chain1", key="extract")
            assert c.call("Stat", key="chain1").info.kind == proto.COMMITTED
    finally:
        server.stop(None)


def test_list_update_usage_remove_cleanup(client: Client, layers: FakeLayers, tmp_path: Path) -> None:
    client.call("Prepare", key="a", parent="")
    client.call("Commit", name="c", key="a", labels={"x": "1"})
    client.call("Prepare", key="b", parent="c")
    infos = [i for resp in client.call("List") for i in resp.info]
    assert {(i.name, i.kind, i.parent) for i in infos} == {("c", proto.COMMITTED, ""), ("b", proto.ACTIVE, "c")}
    info = proto.Info(name="c", labels={"y": "2"})
    updated = client.call("Update", info=info, update_mask={"paths": ["labels.y"]}).info
    assert dict(updated.labels) == {"x": "1", "y": "2"}
    usage = client.call("Usage", key="c")
    assert usage.size >= 0 and usage.inodes == 0
    with pytest.raises(grpc.RpcError) as e:
        client.call("Remove", key="c")
    assert _code(e) == grpc.StatusCode.FAILED_PRECONDITION
    client.call("Remove", key="b")
    client.call("Remove", key="c")
    client.call("Cleanup")
    assert list((tmp_path / "snap" / "snapshots").iterdir()) == []
    assert client.call("List") == []


def test_cleanup_releases_lazy_layers_no_snapshot_uses(client: Client, layers: FakeLayers) -> None:
    labels = {TARGET_REF: "chain1", STARGZ_REF: "reg/img:tag", STARGZ_DIGEST: LAYER}
    with pytest.raises(grpc.RpcError):
        client.call("Prepare", key="x", parent="", labels=labels)
    client.call("Cleanup")
    assert layers.released == []
    client.call("Remove", key="chain1")
    client.call("Cleanup")
    assert layers.released == [LAYER]


def test_wire_format_matches_containerds_field_numbers() -> None:
    info = proto.Info(name="n", parent="p", kind=proto.COMMITTED, labels={"k": "v"})
    info.created_at.seconds = 1
    assert info.SerializeToString() == b"\n\x01n\x12\x01p\x18\x03\"\x02\x08\x01\x32\x06\n\x01k\x12\x01v"
    req = proto.MESSAGES["UpdateSnapshotRequest"](snapshotter="s", info=proto.Info(name="n"),
                                                  update_mask={"paths": ["labels.a"]})
    assert req.SerializeToString() == b"\n\x01s\x12\x03\n\x01n\x1a\x0a\n\x08labels.a"
    mount = proto.Mount(type="overlay", source="overlay", options=["ro"])
    resp = proto.MESSAGES["MountsResponse"](mounts=[mount]).SerializeToString()
    assert resp == b"\n\x16\n\x07overlay\x12\x07overlay\x22\x02ro"
    usage = proto.MESSAGES["UsageResponse"].FromString(b"\x08\x80\x01\x10\x05")
    assert (usage.size, usage.inodes) == (128, 5)


def test_an_unreachable_registry_or_a_hostile_label_means_containerd_unpacks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from shim.snapshotter.lazy import LayerSource, StoreLayers

    monkeypatch.setenv("LAZYSHIM_REGISTRY_RETRIES", "0")
    layers = StoreLayers(tmp_path / "store")
    assert layers.ensure(LayerSource("t", "127.0.0.1:1/img:tag", LAYER, None)) is None
    assert layers.ensure(LayerSource("t", "127.0.0.1:1/img:tag", "../../etc", None)) is None
    assert layers.ensure(LayerSource("t", "not a reference", LAYER, None)) is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("lazyshim: snapshotter: layer ") for line in err)
    assert list((tmp_path / "store" / "layers").iterdir()) == []


def test_serve_refuses_an_address_that_is_not_a_socket_and_leaves_it(tmp_path: Path) -> None:
    from shim.snapshotter.server import serve

    victim = tmp_path / "important"
    victim.write_text("keep me")
    with pytest.raises(LazyshimError, match="not a socket"):
        serve(victim, tmp_path / "root", tmp_path / "store")
    assert victim.read_text() == "keep me"
