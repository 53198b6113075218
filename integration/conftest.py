"""Session fixtures: one real registry and the test images pushed into it.

Nothing is skipped: a missing tool or a failed build makes every dependent test error with the
one-line reason, because a silently skipped integration suite looks exactly like a passing one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from integration.images import BuildStats, ImageBuildError, build_and_push, check_tools
from integration.lazyenv import Env
from integration.registry import Registry, RegistryError
from integration.storeview import store_mounts


@pytest.fixture(scope="session", autouse=True)
def no_node_mirrors() -> Iterator[None]:
    """Keep the node's own mirror configuration (registries.conf, containerd certs.d) out of
    every lazyshim the tests start: tests name their mirrors themselves."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAZYSHIM_REGISTRIES_CONF", os.environ.get("LAZYSHIM_REGISTRIES_CONF") or os.devnull)
        mp.setenv("LAZYSHIM_HOSTS_DIR", os.environ.get("LAZYSHIM_HOSTS_DIR", ""))
        yield


@pytest.fixture(scope="session")
def registry() -> Iterator[Registry]:
    """A private docker-registry on 127.0.0.1, stopped and deleted at the end of the session."""
    try:
        reg = Registry().start()
    except RegistryError as exc:
        pytest.fail(f"registry: {exc}", pytrace=False)
    try:
        yield reg
    finally:
        reg.stop()


@pytest.fixture(scope="session")
def image_build_stats() -> BuildStats:
    """Filled by the ``images`` fixture: which variants were built and which came from the cache."""
    return BuildStats()


@pytest.fixture(scope="session")
def images(registry: Registry, image_build_stats: BuildStats) -> dict[str, str]:
    """``{"name:variant": "127.0.0.1:PORT/name:variant"}`` for every test image variant."""
    try:
        check_tools()
        return build_and_push(registry, stats=image_build_stats)
    except ImageBuildError as exc:
        pytest.fail(f"test images: {exc}", pytrace=False)


@pytest.fixture
def new_env(tmp_path: Path) -> Iterator[Callable[[], Env]]:
    """Makes private lazyshim environments (store + runtime dir); their containers are
    removed and their runtime dirs deleted afterwards."""
    made: list[Env] = []

    def make() -> Env:
        made.append(Env(tmp_path))
        return made[-1]
    yield make
    for e in made:
        e.remove_containers()
        shutil.rmtree(e.rundir, ignore_errors=True)


@pytest.fixture(autouse=True)
def release_store_mounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Detach the metadata tmpfs (and the read-only views on it) of every store a test made:
    a mount left under a deleted temp dir would hold memory and confuse later tests.  Only
    below this session's temp dir: another test session on the host has stores of its own."""
    mine = f"{os.path.realpath(tmp_path_factory.getbasetemp())}/"
    before = store_mounts()
    yield
    for mp in sorted(store_mounts() - before):
        if mp.startswith(mine):
            subprocess.run(["umount", "-R", "-l", mp], capture_output=True)
