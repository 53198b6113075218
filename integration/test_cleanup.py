"""Nothing left behind: signals to `lazyshim run`, a killed `lazyshim run`, a killed pull,
and `delete --force` after the supervisor died.  Real runc, real overlayfs, the real registry.

Each test has its own store and runtime dir, so "no state dir" and the delegate's `list`
are about this test only.  Synchronisation is on what the workload or the pull leaves on
disk (polled with a deadline), never on sleeps.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from integration.lazyenv import RUNC, Env, poll


@pytest.fixture
def env(new_env, images: dict[str, str]) -> Env:
    e = new_env()
    e("pull", images["busybox:esgz"])
    return e


def _ready(env: Env, name: str, proc: subprocess.Popen) -> None:
    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"lazyshim run ended early ({proc.returncode})")
        return (env.store / "containers" / name / "upper" / "ready").exists()
    poll(up, f"{name} to write /ready")


TRAPPING = "trap 'echo got-TERM; exit 143' TERM; trap 'echo got-INT; exit 130' INT; touch /ready; sleep 300 & wait"


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "got-TERM"), (signal.SIGINT, 130, "got-INT")])
def test_signal_is_forwarded_and_rm_cleans_up(env: Env, images: dict[str, str], sig: int, code: int,
                                               word: str) -> None:
    name = f"sig{sig}-{os.getpid()}"
    proc = env.popen("run", "--rm", "--name", name, images["busybox:esgz"], "sh", "-c", TRAPPING)
    _ready(env, name, proc)
    assert env.delegate_list() == name
    assert env.mounts(), "the container's overlay is mounted while it runs"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert word in out, "the container's init got the signal"
    assert proc.returncode == code, err
    env.assert_nothing_left(name)


def test_second_signal_kills_a_container_that_ignores_the_first(env: Env, images: dict[str, str]) -> None:
    """`sleep` as the container's init ignores SIGTERM; a SIGINT right after kills it."""
    name = f"stubborn-{os.getpid()}"
    proc = env.popen("run", "--rm", "--name", name, images["busybox:esgz"], "sh", "-c", "touch /ready; exec sleep 300")
    _ready(env, name, proc)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 137, err
    assert "Traceback" not in err
    env.assert_nothing_left(name)


def test_killed_run_is_swept_by_the_next_command(env: Env, images: dict[str, str]) -> None:
    name = f"orphan-{os.getpid()}"
    proc = env.popen("run", "--rm", "--name", name, images["busybox:esgz"], "sh", "-c", "touch /ready; exec sleep 300",
                     out=subprocess.DEVNULL)
    _ready(env, name, proc)
    proc.kill()
    proc.wait(timeout=30)
    assert env.delegate_list() == name, "runc keeps the container of a killed lazyshim"
    assert env.mounts() and env.state_dirs() == [name]
    env("images")
    env.assert_nothing_left(name)


def test_killed_run_without_rm_keeps_a_stopped_container(env: Env, images: dict[str, str]) -> None:
    name = f"kept-{os.getpid()}"
    proc = env.popen("run", "--name", name, images["busybox:esgz"], "sh", "-c", "touch /ready; exec sleep 300",
                     out=subprocess.DEVNULL)
    _ready(env, name, proc)
    proc.kill()
    proc.wait(timeout=30)
    p = env("gc")
    assert f"removed container {name}" in p.stdout
    assert env.delegate_list() == "" and env.mounts() == [] and env.state_dirs() == []
    assert (env.store / "containers" / name / "upper" / "ready").exists(), "its writes are kept"
    assert env("gc").stdout.strip() == "nothing to remove"


def test_error_in_lazyshim_still_cleans_up(env: Env, images: dict[str, str]) -> None:
    name = f"bad-{os.getpid()}"
    p = env("run", "--rm", "--name", name, "--user", "nosuchuser", images["busybox:esgz"], "true", check=False)
    assert p.returncode != 0 and "nosuchuser" in p.stderr and "Traceback" not in p.stderr
    env.assert_nothing_left(name)


def test_pull_killed_midway_leaves_no_layer_and_is_swept(new_env, images: dict[str, str]) -> None:
    env = new_env()
    proc = env.popen("pull", images["python:esgz"], out=subprocess.DEVNULL)
    tmp = env.store / "tmp"

    def staging_while_stopped() -> Path | None:
        """A staging dir that still exists with the pull stopped: the pull is mid-layer."""
        if proc.poll() is not None:
            raise AssertionError("the pull finished before a staging dir was seen")
        found = [p for p in (tmp.iterdir() if tmp.exists() else []) if _layer_staging(p.name, proc.pid)]
        if not found:
            return None
        os.kill(proc.pid, signal.SIGSTOP)
        if found[0].exists():
            return found[0]
        os.kill(proc.pid, signal.SIGCONT)
        return None

    staging = poll(staging_while_stopped, "a pull staging dir")
    proc.kill()
    proc.wait(timeout=30)
    layer = staging.name.rsplit(".", 1)[0]
    assert not (env.store / "layers" / layer).exists(), "a half-built layer reached layers/"
    assert staging.exists()
    env("pull", images["python:esgz"])
    assert not staging.exists(), "the next pull swept the dead pull's staging dir"
    assert (env.store / "layers" / layer / "meta.cbor").exists()


def _layer_staging(name: str, pid: int) -> bool:
    """`<layer dir name>.<pid>`: a pull's staging tree (not the layout probe's dir beside it)."""
    from shim.errors import LazyshimError
    from shim.store.layout import digest_dirname

    layer, _, owner = name.rpartition(".")
    try:
        return owner == str(pid) and digest_dirname(layer.replace("-", ":", 1)) == layer
    except LazyshimError:
        return False


def _zombie() -> subprocess.Popen:
    """A child that has exited but is not reaped: its pid is dead and cannot be reused."""
    child = subprocess.Popen(["true"])
    poll(lambda: Path(f"/proc/{child.pid}/stat").read_text().rsplit(") ", 1)[1][:1] == "Z", "the child to exit")
    return child


def test_probe_dir_of_a_dead_pid_is_swept_without_deleting_through_its_mounts(env: Env, tmp_path: Path) -> None:
    """A layout probe killed half-way leaves `tmp/probe.<pid>` with mounts inside.  The sweep
    detaches them before deleting the dir: a bind mount there must not lose its files."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("not the store's\n")
    dead = _zombie()
    try:
        probe = env.store / "tmp" / f"probe.{dead.pid}"
        for d in ("meta", "view", "data"):
            (probe / d).mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe / "meta")], check=True)
        (probe / "meta" / "f").write_text("x")
        subprocess.run(["mount", "--bind", str(outside), str(probe / "data")], check=True)
        assert len(env.mounts()) == 2
        env("images")
        assert not probe.exists(), "the next command swept the dead probe's dir"
        assert env.mounts() == []
        assert (outside / "keep").read_text() == "not the store's\n", "nothing was deleted through the bind mount"
    finally:
        dead.wait()
        for d in ("data", "meta"):
            subprocess.run(["umount", "-l", str(env.store / "tmp" / f"probe.{dead.pid}" / d)], capture_output=True)


def test_the_store_mounts_stay_while_a_layer_needs_them(env: Env, images: dict[str, str]) -> None:
    """The metadata tmpfs and its layer views (layout v2) are the store's, not a process's:
    the sweep leaves them; they go with the last layer (rmi, or gc once a container that kept
    the layers of a removed image is gone)."""
    from integration.storeview import layout_name

    if layout_name(env.store) != "v2":
        pytest.skip("layout v1 mounts nothing of its own")
    bb = images["busybox:esgz"]
    assert env.own_mounts(), "a pulled v2 store has its metadata tmpfs mounted"
    assert env("gc").stdout.strip() == "nothing to remove"
    assert env.own_mounts(), "gc leaves the mounts of a store that still has layers"
    name = f"keeper-{os.getpid()}"
    env("run", "-d", "--rm", "--name", name, bb, "sleep", "300")
    env("rmi", bb)
    assert env.own_mounts(), "a running container keeps its layers, and so their tree"
    env("rm", "-f", name)
    p = env("gc")
    assert "removed layer" in p.stdout and "metadata tmpfs" in p.stdout, p.stdout
    assert env.own_mounts() == [] and env.mounts() == []
    env("run", "--rm", bb, "true")  # pulled again, mounted again
    assert env.own_mounts()
    env("rmi", bb)
    assert env.own_mounts() == [] and env.mounts() == []
    assert env("gc").stdout.strip() == "nothing to remove"


def test_force_delete_after_the_supervisor_died(tmp_path: Path, new_env, images: dict[str, str]) -> None:
    """The runc path: lazyshim mounted the image on an empty rootfs (annotation); its
    supervisor is killed; `delete --force` still unmounts and removes all of ours."""
    from integration.test_runtime_cli import Runtime, bundle, ok

    env = new_env()
    empty = tmp_path / "rootfs"
    empty.mkdir()
    b = bundle(tmp_path, empty, ["sleep", "1000"], annotations={"run.lazyshim.image": images["busybox:esgz"]})
    rt = Runtime(tmp_path / "runc-root", env=env.env)
    cid = f"d{os.getpid()}"
    ok(rt("create", "--bundle", str(b), cid))
    ok(rt("start", cid))
    assert os.path.ismount(empty)
    os.kill(env.supervisor_pid(rt.root, cid), signal.SIGKILL)
    ok(rt("delete", "--force", cid))
    assert rt("list", "-q").stdout == ""
    assert not os.path.ismount(empty) and os.listdir(empty) == []
    assert env.mounts() == []
    assert not env.oci_state(rt.root, cid).exists()
    assert list((env.store / "containers" / "oci").glob("*/*")) == [], "the upper and work dirs are gone"


def test_sweep_removes_runc_path_state_whose_container_is_gone(tmp_path: Path, new_env,
                                                               images: dict[str, str]) -> None:
    """An engine that never called `delete`: the delegate's state is gone (here removed as
    a reboot would), the supervisor is dead; the next lazyshim command removes the rest."""
    from integration.test_runtime_cli import Runtime, bundle, ok

    env = new_env()
    empty = tmp_path / "rootfs"
    empty.mkdir()
    b = bundle(tmp_path, empty, ["true"], annotations={"run.lazyshim.image": images["busybox:esgz"]})
    rt = Runtime(tmp_path / "runc-root", env=env.env)
    cid = f"s{os.getpid()}"
    ok(rt("create", "--bundle", str(b), cid))
    os.kill(env.supervisor_pid(rt.root, cid), signal.SIGKILL)
    ok(rt("delete", "--force", cid, binary=RUNC))  # behind lazyshim's back
    assert env.oci_state(rt.root, cid).exists() and os.path.ismount(empty)
    p = env("gc")
    assert "state dir" in p.stdout
    assert not env.oci_state(rt.root, cid).exists()
    assert not os.path.ismount(empty) and env.mounts() == []
