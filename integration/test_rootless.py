"""Rootless: an ordinary user with a subuid range pulls and runs lazily (user namespace,
overlay with userxattr, in-image owners through the id mapping)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from integration.users import USER, ensure_user


@pytest.fixture(scope="module")
def rootless_user():
    """A real unprivileged user with a subuid/subgid range and its own XDG dirs."""
    pw = ensure_user()
    home = Path(tempfile.mkdtemp(prefix="lazyshim-rootless-"))  # pytest's tmp dirs are root-only
    shutil.chown(home, pw.pw_uid, pw.pw_gid)
    run = home / "run"
    run.mkdir(mode=0o700)
    shutil.chown(run, pw.pw_uid, pw.pw_gid)
    env = {"HOME": str(home), "XDG_RUNTIME_DIR": str(run), "PATH": os.environ["PATH"]}
    probe = _as_user(env, "--version")
    if probe.returncode != 0:
        shutil.rmtree(home, ignore_errors=True)
        # Not a lazyshim failure: the checkout (or its venv) lies below a directory an
        # ordinary user may not enter, e.g. /root.  Rootless needs the code readable.
        pytest.skip(f"{USER} cannot run lazyshim from this checkout: {probe.stderr.strip()[:200]}")
    conf = home / ".config" / "containers"
    conf.mkdir(parents=True)
    # rootless podman here: no cgroup delegation, no raising rlimits; our layer store for pulls
    (conf / "containers.conf").write_text(
        '[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
    (conf / "storage.conf").write_text(
        f'[storage]\ndriver = "overlay"\n[storage.options]\n'
        f'additionallayerstores = ["{home}/.local/share/lazyshim/als:ref"]\n')
    for d in (home / ".config", conf):
        shutil.chown(d, pw.pw_uid, pw.pw_gid)
    for f in conf.iterdir():
        shutil.chown(f, pw.pw_uid, pw.pw_gid)
    yield env
    subprocess.run(["pkill", "-u", USER], capture_output=True)  # rootless podman's pause process
    shutil.rmtree(home, ignore_errors=True)


def _as_user(env: dict[str, str], *args: str, timeout: float = 120, program: list[str] | None = None
             ) -> subprocess.CompletedProcess:
    program = program or [sys.executable, "-m", "runtime.main"]
    return subprocess.run(["runuser", "-u", USER, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()),
                           *program, *args],
                          capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent.parent)


@pytest.mark.parametrize("trap", ["notify", "ptrace"])
def test_rootless_pull_and_run_lazily(rootless_user: dict[str, str], images: dict[str, str], registry,
                                      trap: str) -> None:
    # Each backend its own store (XDG data dir), so each run starts with nothing filled.
    rootless_user = dict(rootless_user, LAZYSHIM_TRAP=trap, XDG_DATA_HOME=f"{rootless_user['HOME']}/data-{trap}")
    ref = images["busybox:esgz"]
    p = _as_user(rootless_user, "pull", ref)
    assert p.returncode == 0, p.stderr
    store = Path(rootless_user["XDG_DATA_HOME"]) / "lazyshim"
    assert (store / "layers").is_dir(), "a rootless store lives under the user's XDG data dir"
    registry.clear_access_log()
    script = ("cat /app/hello.txt; ls -ln /app/hello.txt; "
              "chmod 600 /app/hello.sh && sha256sum /app/hello.sh")
    p = _as_user(rootless_user, "run", "--rm", "--no-background-fetch", ref, "sh", "-c", script)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "hello from the app layer"
    assert lines[1].split()[2:4] == ["0", "0"], "in-image owners survive the id mapping"
    import hashlib

    assert lines[2].split()[0] == hashlib.sha256(b"#!/bin/sh\necho hello from busybox sh\n").hexdigest()
    host, _, rest = ref.partition("/")
    from integration.images import fetch_manifest

    name, _, tag = rest.rpartition(":")
    app = fetch_manifest(host, name, tag)["layers"][-1]
    assert 0 < registry.bytes_served(app["digest"]) < app["size"] / 2, "the 4.5 MiB file was not needed"


def test_rootless_podman_with_lazyshim_runtime(rootless_user: dict[str, str], images: dict[str, str],
                                               registry) -> None:
    """An ordinary user's podman pulls through the user's layer store and runs with
    `--runtime lazyshim`: the supervisor runs inside podman's user namespace."""
    ref = images["python:esgz"]
    assert _as_user(rootless_user, "pull", ref).returncode == 0
    lazyshim = str(Path(sys.executable).parent / "lazyshim")
    podman = ["podman"]
    pulled = _as_user(rootless_user, "pull", "--tls-verify=false", ref, program=podman)
    assert pulled.returncode == 0, pulled.stderr
    registry.clear_access_log()
    p = _as_user(rootless_user, "--runtime", lazyshim, "run", "--rm", "--network", "none",
                 "--annotation", "run.lazyshim.background-fetch=none", ref,
                 "python3", "-c", "print('rootless podman, lazily')", program=podman)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "rootless podman, lazily\n"
    from integration.images import fetch_manifest

    host, _, rest = ref.partition("/")
    name, _, tag = rest.rpartition(":")
    layers = fetch_manifest(host, name, tag)["layers"]
    served = sum(registry.bytes_served(la["digest"]) for la in layers)
    assert 0 < served < sum(la["size"] for la in layers) * 0.8
