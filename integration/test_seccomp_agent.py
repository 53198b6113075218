"""A user's own seccomp agent on a lazy bundle is never bypassed: real runc, real registry,
an agent of our own (integration/seccomp_agent.py) on the profile's listenerPath.

The agent makes `mkdir` return 0 without creating anything; a container that prints
`mkdir=0` and `absent` was answered by it.  Every file the container reads is compared with
the image, because such a container runs without lazyshim's supervisor: its image must be
complete before it starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.seccomp_agent import SeccompAgent
from integration.test_lazy_run import LAZYSHIM
from integration.test_runtime_cli import LAZYSHIM as LAZYSHIM_BIN
from integration.test_runtime_cli import RANDOM_SHA, RUN_FLAGS, RUNC, Runtime, Store, bundle, sh
from runtime.paths import oci_state_dir

HELLO_SHA = hashlib.sha256(b"hello from the app layer\n").hexdigest()
BUSYBOX_SHA = hashlib.sha256(Path("/bin/busybox").read_bytes()).hexdigest()
SCRIPT = ("mkdir /tmp/agent-probe; echo mkdir=$?; test -e /tmp/agent-probe && echo present || echo absent; "
          "sha256sum /app/random.bin /app/hello.txt /bin/busybox")
EXPECTED = ["mkdir=0", "absent", f"{RANDOM_SHA}  /app/random.bin", f"{HELLO_SHA}  /app/hello.txt",
            f"{BUSYBOX_SHA}  /bin/busybox"]
WARNING = "one listener"


def agent_profile(sock: Path) -> dict:
    return {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
            "listenerPath": str(sock), "listenerMetadata": "probe",
            "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_NOTIFY"}]}


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """sun_path holds 107 bytes: the agent's socket lives under a short name."""
    d = Path(tempfile.mkdtemp(prefix="lza-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def agent(short_dir: Path) -> Iterator[SeccompAgent]:
    with SeccompAgent(short_dir / "agent.sock") as a:
        yield a


@pytest.fixture
def busybox(tmp_path: Path, images: dict[str, str]) -> Iterator[Store]:
    s = Store(tmp_path / "store", images["busybox:esgz"])
    yield s
    s.close()


@pytest.fixture
def rt(tmp_path: Path) -> Iterator[Runtime]:
    r = Runtime(tmp_path / "runc-root", env=dict(os.environ, LAZYSHIM_BACKGROUND_FETCH="none"))
    yield r
    r.cleanup()


def lazyshim(store: Path, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(LAZYSHIM + list(args), env=dict(os.environ, LAZYSHIM_ROOT=str(store), **(env or {})),
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert not check or p.returncode == 0, f"lazyshim {' '.join(args)} -> {p.returncode}: {p.stderr.strip()}"
    return p


def _layers_complete(store: Store) -> bool:
    from shim import api
    from shim.lazyroot import layers_complete

    return layers_complete(api.open_store(store.root), store.image.layers)


def test_lazy_bundle_keeps_the_users_agent(tmp_path: Path, busybox: Store, rt: Runtime,
                                           agent: SeccompAgent) -> None:
    rootfs = busybox.rootfs(tmp_path / "c")
    b = agent_bundle(tmp_path, rootfs, agent_profile(agent.path))
    assert busybox.placeholder("/app/random.bin").stat().st_blocks == 0
    p = rt("run", "--bundle", str(b), "ag1")
    assert (p.returncode, p.stdout.splitlines()) == (0, EXPECTED), p.stderr
    assert agent.faked >= 1 and [s["state"]["id"] for s in agent.states] == ["ag1"]
    assert agent.states[0]["state"]["bundle"] == str(b), "delegated with the caller's own bundle"
    warnings = [line for line in p.stderr.splitlines() if WARNING in line]
    assert len(warnings) == 1 and "listenerPath" in warnings[0], p.stderr
    assert not (tmp_path / "c" / "upper" / "tmp" / "agent-probe").exists()
    assert _layers_complete(busybox), "the image was filled in full before the container started"
    assert not Path(oci_state_dir(str(rt.root), "ag1")).exists(), "no supervisor, no state of ours"


def agent_bundle(base: Path, rootfs: Path | str, profile: dict, **extra) -> Path:
    """A bundle running SCRIPT under `profile`."""
    b = bundle(base, rootfs, ["sh", "-c", SCRIPT], **extra)
    cfg = json.loads((b / "config.json").read_text())
    cfg["linux"]["seccomp"] = profile
    (b / "config.json").write_text(json.dumps(cfg))
    return b


def test_a_missing_listener_fails_as_under_runc(tmp_path: Path, busybox: Store, rt: Runtime,
                                                short_dir: Path) -> None:
    rootfs = busybox.rootfs(tmp_path / "c")
    b = agent_bundle(tmp_path, rootfs, agent_profile(short_dir / "nobody-listens.sock"))
    under_runc = rt("run", "--bundle", str(b), "m1", binary=RUNC)
    p = rt("run", "--bundle", str(b), "m2")
    assert under_runc.returncode != 0 and "seccomp agent" in under_runc.stderr, under_runc.stderr
    assert p.returncode == under_runc.returncode, p.stderr
    assert "failed to connect with seccomp agent" in p.stderr, p.stderr
    assert not Path(oci_state_dir(str(rt.root), "m2")).exists()
    assert rt("list", "-q").stdout == ""


def test_refuse_policy_is_a_one_line_error_and_fills_nothing(tmp_path: Path, busybox: Store, rt: Runtime,
                                                             agent: SeccompAgent) -> None:
    rootfs = busybox.rootfs(tmp_path / "c")
    b = agent_bundle(tmp_path, rootfs, agent_profile(agent.path))
    p = rt("run", "--bundle", str(b), "r1", env=dict(rt.env, LAZYSHIM_AGENT_POLICY="refuse"))
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("lazyshim: "), p.stderr
    assert "listenerPath" in lines[0] and "LAZYSHIM_AGENT_POLICY=refuse" in lines[0]
    assert agent.states == [] and p.stdout == ""
    assert busybox.placeholder("/app/random.bin").stat().st_blocks == 0, "nothing was fetched"
    assert rt("list", "-q").stdout == ""
    # The annotation says the same for engines that do not pass the environment on (podman).
    b2 = agent_bundle(tmp_path / "2", rootfs, agent_profile(agent.path),
                      annotations={"run.lazyshim.agent-policy": "refuse"})
    p = rt("create", "--bundle", str(b2), "r2")
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_annotation_bundle_keeps_the_users_agent(tmp_path: Path, images: dict[str, str], rt: Runtime,
                                                 agent: SeccompAgent) -> None:
    """podman `--rootfs DIR --annotation run.lazyshim.image=REF`: we mount, the agent answers."""
    empty = tmp_path / "empty"
    empty.mkdir()
    b = agent_bundle(tmp_path, empty, agent_profile(agent.path),
                     annotations={"run.lazyshim.image": images["busybox:esgz"]})
    r = Runtime(rt.root, env=dict(rt.env, LAZYSHIM_ROOT=str(tmp_path / "store")))
    p = r("run", "--bundle", str(b), "an0", env=dict(r.env, LAZYSHIM_AGENT_POLICY="refuse"))
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert os.listdir(empty) == [] and not Path(oci_state_dir(str(rt.root), "an0")).exists(), "nothing left"
    p = r("run", "--bundle", str(b), "an1")
    assert (p.returncode, p.stdout.splitlines()) == (0, EXPECTED), p.stderr
    assert agent.faked >= 1 and [s["state"]["id"] for s in agent.states] == ["an1"]
    assert os.listdir(empty) == [], "unmounted again"


def test_lazyshim_run_with_an_agent_profile(tmp_path: Path, images: dict[str, str], agent: SeccompAgent) -> None:
    ref = images["busybox:esgz"]
    store = tmp_path / "store"
    pfile = tmp_path / "profile.json"
    pfile.write_text(json.dumps(agent_profile(agent.path)))
    opts = ("--security-opt", f"seccomp={pfile}")
    lazyshim(store, "pull", ref)
    p = lazyshim(store, "run", "--rm", *opts, ref, "sh", "-c", SCRIPT, env={"LAZYSHIM_AGENT_POLICY": "refuse"},
                 check=False)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 125 and len(lines) == 1 and "listenerPath" in lines[0], p.stderr  # podman's code
    assert agent.states == []
    p = lazyshim(store, "run", "--rm", "--no-background-fetch", *opts, ref, "sh", "-c", SCRIPT)
    assert p.stdout.splitlines() == EXPECTED, p.stderr
    assert agent.faked >= 1 and len(agent.states) == 1
    assert sum(WARNING in line for line in p.stderr.splitlines()) == 1, p.stderr
    # The image is complete now: nothing to refuse, the agent answers again.
    p = lazyshim(store, "run", "--rm", *opts, ref, "sh", "-c", SCRIPT, env={"LAZYSHIM_AGENT_POLICY": "refuse"})
    assert p.stdout.splitlines() == EXPECTED and len(agent.states) == 2, p.stderr
    assert WARNING not in p.stderr
    # A missing listener: runc's own failure and exit code, after the fill.
    pfile.write_text(json.dumps(agent_profile(tmp_path / "gone.sock")))
    p = lazyshim(store, "run", "--rm", *opts, ref, "true", check=False)
    assert p.returncode == 125 and "failed to connect with seccomp agent" in p.stderr, p.stderr


def test_podman_lazy_rootfs_keeps_the_users_agent(tmp_path: Path, busybox: Store, agent: SeccompAgent,
                                                  short_dir: Path) -> None:
    """podman puts the profile's listenerPath into the bundle it hands to `--runtime lazyshim`."""
    rootfs = busybox.rootfs(tmp_path / "c")
    pfile = tmp_path / "profile.json"
    pfile.write_text(json.dumps(agent_profile(agent.path)))
    top = short_dir / "podman"
    podman = ["podman", "--root", str(top / "root"), "--runroot", str(top / "run"), "--storage-driver", "vfs",
              "--cgroup-manager", "cgroupfs", "--events-backend", "none", "--runtime", LAZYSHIM_BIN]
    env = {k: v for k, v in os.environ.items() if k != "LAZYSHIM_ROOT"}
    try:
        p = sh(*podman, *RUN_FLAGS, "--security-opt", f"seccomp={pfile}", "--rootfs", str(rootfs),
               "sh", "-c", SCRIPT, env=env)
    finally:
        sh(*podman, "rm", "--all", "--force")
    assert (p.returncode, p.stdout.splitlines()) == (0, EXPECTED), p.stderr
    assert agent.faked >= 1 and len(agent.states) == 1
    assert _layers_complete(busybox)
