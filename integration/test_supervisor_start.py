"""The supervisor is started before its container's rootfs is mounted (`runtime.attach.start`):
it loads the layers meanwhile and looks at the rootfs only once told to go.  A runtime that
gives up first ends it, and a start that fails is still one line of error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from integration.test_lazy_run import lazyshim
from runtime import attach
from shim.errors import LazyshimError
from shim.store.layout import Store
from shim.store.refs import resolve_image


def _start(tmp_path: Path, images: dict[str, str], rootfs: Path) -> tuple[attach.Starting, Path]:
    store = tmp_path / "store"
    ref = images["busybox:esgz"]
    lazyshim(store, "pull", ref)
    image = resolve_image(Store(store), ref)
    sdir = tmp_path / "state"
    config = {"process": {"args": ["/bin/sh"], "env": ["PATH=/bin"], "cwd": "/"}}
    return attach.start(config, "start-test", store, image.layers, rootfs, sdir=sdir, background="none",
                        trap="notify"), sdir


def test_a_runtime_that_gives_up_before_go_ends_its_supervisor(tmp_path: Path, images: dict[str, str]) -> None:
    starting, sdir = _start(tmp_path, images, tmp_path / "never-mounted")
    assert int((sdir / "supervisor.pid").read_text()) == starting.proc.pid  # a teardown finds it at once
    starting.abandon()
    assert starting.proc.wait(timeout=120) == 1
    assert "gave up before the container's rootfs was mounted" in (sdir / "supervisor.log").read_text()


def test_the_rootfs_is_looked_at_only_after_go(tmp_path: Path, images: dict[str, str]) -> None:
    rootfs = tmp_path / "rootfs"
    starting, sdir = _start(tmp_path, images, rootfs)
    rootfs.mkdir()  # made after the supervisor started: it must not have looked yet
    try:
        pid = starting.go()
        assert pid == starting.proc.pid and os.path.exists(f"/proc/{pid}")
        config: dict = {}
        starting.patch(config)
        assert config["linux"]["seccomp"]["listenerPath"].endswith(".sock")
    finally:
        attach.stop_supervisor("start-test", sdir)
    assert starting.proc.wait(timeout=120) is not None and not sdir.exists()


def test_a_supervisor_that_cannot_prefill_fails_go_in_one_line(tmp_path: Path, images: dict[str, str]) -> None:
    starting, sdir = _start(tmp_path, images, tmp_path / "no-such-rootfs")
    with pytest.raises(LazyshimError, match=r"^supervisor failed to start: supervisor: prefill: .*no-such-rootfs") as e:
        starting.go()
    assert "\n" not in str(e.value)
    assert starting.proc.returncode == 1


def test_a_named_user_is_read_from_the_passwd_the_supervisor_prefilled(tmp_path: Path,
                                                                        images: dict[str, str]) -> None:
    """The runtime resolves `--user NAME` after the supervisor is ready, from the image's own
    /etc/passwd, which the supervisor filled before it said so (the runtime fills nothing)."""
    store = tmp_path / "store"
    p = lazyshim(store, "run", "--rm", "--no-background-fetch", "--user", "nobody", images["busybox:esgz"],
                 "sh", "-c", "id -u; id -g")
    assert p.stdout.split() == ["65534", "65534"]
