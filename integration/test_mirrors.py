"""Mirrors and fill sources end to end, with real docker-registry processes: a pull-through cache
(Distribution's `proxy.remoteurl`) named as a mirror in a registries.conf, the mirror stopped
under a running image, and a layer shared by images of two registries.

What Distribution 2.8's pull-through cache does (seen here): a Range request for a blob it does
not hold yet is answered 200 with the whole blob while it fetches the blob from upstream a
second time to keep a copy; once the copy is stored, ranges are answered 206 from it and the
upstream sees no blob request at all.  lazyshim refuses a 200 to a range request (it would
download whole layers per file) and asks the next endpoint, so the tests that count where the
ranges went warm the cache first.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from integration.faultproxy import Fault, FaultProxy
from integration.registry import AccessLogEntry, Registry
from shim.registry import RegistryClient

LAZYSHIM = [sys.executable, "-m", "runtime.main"]
HASH_SCRIPT = (
    "import hashlib,sys\n"
    "for p in sys.argv[1:]:\n"
    "    print(p, hashlib.sha256(open(p,'rb').read()).hexdigest())\n"
)
FILES = ["/usr/bin/python3.11", "/usr/lib/python3.11/json/decoder.py", "/usr/lib/python3.11/os.py"]


def _lazyshim(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    p = subprocess.run(LAZYSHIM + list(args), env=dict(os.environ, **env), capture_output=True, text=True,
                       timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"lazyshim {' '.join(args)} failed ({p.returncode}): {p.stderr.strip()}")
    return p


def _copy_image(src: Registry, src_ref: str, dst: Registry, repo: str, label: str | None = None) -> tuple[str, list]:
    """Push the image at `src_ref` to `dst` as repo:esgz (with a label in its config: another
    image with the same layers); returns its reference and its layer digests."""
    name, _, tag = src_ref.partition("/")[2].rpartition(":")
    with RegistryClient(src.host) as s, RegistryClient(dst.host) as d:
        m = s.get_manifest(name, tag)
        for layer in m.layers:
            d.push_blob(repo, layer.digest, s.get_blob(name, layer.digest, max_size=1 << 30))
        config, raw = s.get_blob(name, m.config.digest, max_size=4 << 20), m.raw
        if label is not None:
            doc = json.loads(config)
            doc.setdefault("config", {}).setdefault("Labels", {})["variant"] = label
            config = json.dumps(doc).encode()
            mdoc = json.loads(raw)
            mdoc["config"]["digest"] = "sha256:" + hashlib.sha256(config).hexdigest()
            mdoc["config"]["size"] = len(config)
            raw = json.dumps(mdoc).encode()
        d.push_blob(repo, "sha256:" + hashlib.sha256(config).hexdigest(), config)
        d.push_manifest(repo, "esgz", raw, m.media_type)
        return f"{dst.host}/{repo}:esgz", [layer.digest for layer in m.layers]


def _expected() -> dict[str, str]:
    return {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in FILES}


def _run_hashes(env: dict[str, str], ref: str) -> dict[str, str]:
    p = _lazyshim(env, "run", "--rm", "--no-background-fetch", ref, "python3", "-c", HASH_SCRIPT, *FILES)
    return dict(line.split() for line in p.stdout.splitlines())


def _wait_for(what: str, cond: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll a condition the registry makes true on its own (it logs after answering, it stores
    a proxied blob in the background), bounded."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen within {timeout:.0f}s")
        time.sleep(0.05)


def _ranges(reg: Registry, digests: list[str]) -> list[AccessLogEntry]:
    return [e for e in reg.access_log() if e.blob_digest in digests and e.status == 206]


@pytest.fixture
def origin(registry: Registry, images: dict[str, str]) -> Iterator[tuple[Registry, str, list[str]]]:
    reg = Registry().start()
    try:
        ref, layers = _copy_image(registry, images["python:esgz"], reg, "py")
        yield reg, ref, layers
    finally:
        reg.stop()


@pytest.fixture
def mirror(origin: tuple[Registry, str, list[str]]) -> Iterator[Registry]:
    reg = Registry(proxy_remote=origin[0].url).start()
    try:
        yield reg
    finally:
        reg.stop()


def _env(tmp_path: Path, conf: str) -> dict[str, str]:
    path = tmp_path / "registries.conf"
    path.write_text(conf)
    return {"LAZYSHIM_ROOT": str(tmp_path / "store"), "LAZYSHIM_REGISTRIES_CONF": str(path),
            "LAZYSHIM_HOSTS_DIR": ""}


def _mirror_conf(origin: Registry, mirror: Registry | FaultProxy) -> str:
    return f'[[registry]]\nlocation = "{origin.host}"\n[[registry.mirror]]\nlocation = "{mirror.host}"\n'


def _warm(mirror: Registry, repo: str, digests: list[str]) -> None:
    """Make the pull-through cache hold these blobs (a full GET each, then its stored copy)."""
    for d in digests:
        with urllib.request.urlopen(f"{mirror.url}/v2/{repo}/blobs/{d}", timeout=60) as r:
            r.read()

    def stored(d: str) -> bool:
        try:
            mirror.blob_path(repo, d)
            return True
        except Exception:  # noqa: BLE001 - not there yet
            return False

    for d in digests:
        _wait_for(f"blob {d[:19]} in the cache", lambda d=d: stored(d), timeout=60)


def _hosts_env(tmp_path: Path, origin: Registry, mirror: Registry) -> dict[str, str]:
    """The same mirror as containerd's hosts.toml names it."""
    d = tmp_path / "certs.d" / (origin.host.replace(":", "_") + "_")
    d.mkdir(parents=True)
    (d / "hosts.toml").write_text(f'server = "http://{origin.host}"\n\n[host."http://{mirror.host}"]\n'
                                  '  capabilities = ["pull", "resolve"]\n')
    return dict(_env(tmp_path, ""), LAZYSHIM_HOSTS_DIR=str(tmp_path / "certs.d"))


@pytest.mark.parametrize("config", ["registries.conf", "hosts.toml"])
def test_pull_and_fills_go_through_a_pull_through_cache(tmp_path: Path, origin, mirror: Registry,
                                                         config: str) -> None:
    reg, ref, layers = origin
    _warm(mirror, "py", layers)
    reg.clear_access_log()
    mirror.clear_access_log()
    if config == "hosts.toml":
        env = _hosts_env(tmp_path, reg, mirror)
    else:
        env = _env(tmp_path, _mirror_conf(reg, mirror))
    _lazyshim(env, "pull", ref)
    pulled = len(_ranges(mirror, layers))
    assert pulled > 0, "the TOCs came through the mirror"
    assert _run_hashes(env, ref) == _expected()
    _wait_for("fill ranges in the mirror's log", lambda: len(_ranges(mirror, layers)) > pulled)
    # The origin saw only the cache's own upstream fetches (manifest look-ups, the config it
    # did not hold yet, whole): not one request for a layer, not one range, from anyone.
    log = reg.access_log()
    assert [e for e in log if e.blob_digest in layers] == [] and [e for e in log if e.status == 206] == []
    assert any("/manifests/" in e.path for e in log)


def test_fills_fall_back_to_the_origin_when_the_mirror_is_stopped(tmp_path: Path, origin, mirror: Registry) -> None:
    reg, ref, layers = origin
    _warm(mirror, "py", layers)
    env = _env(tmp_path, _mirror_conf(reg, mirror))
    _lazyshim(env, "pull", ref)
    mirror.clear_access_log()
    p = _lazyshim(env, "run", "--rm", "--no-background-fetch", ref, "python3", "-c", "print('via the mirror')")
    assert p.stdout == "via the mirror\n"
    _wait_for("fill ranges in the mirror's log", lambda: len(_ranges(mirror, layers)) > 0)
    mirror.stop()
    reg.clear_access_log()
    assert _run_hashes(env, ref) == _expected()  # files the first run did not open
    _wait_for("fill ranges in the origin's log", lambda: len(_ranges(reg, layers)) > 0)


@pytest.mark.parametrize("lies_from", ["the pull", "the fills"])
def test_a_mirror_serving_wrong_bytes_falls_through_to_the_origin(tmp_path: Path, origin, lies_from: str) -> None:
    """A mirror that answers every range with bytes of the right length but the wrong content
    (a broken cache, a hostile peer): footers, TOCs and chunks fail their checks, the mirror is
    set aside for that blob and the bytes come from the origin; the container reads the image's
    bytes."""
    reg, ref, layers = origin
    with FaultProxy(reg.host) as liar:
        env = _env(tmp_path, _mirror_conf(reg, liar))
        if lies_from == "the pull":
            liar.set(Fault("corrupt"))
        _lazyshim(env, "pull", ref)
        if lies_from == "the pull":
            assert liar.faulted > 0 and liar.passed == 0, "the pull asked the mirror first"
        else:
            assert liar.passed > 0  # footers and TOCs came through the mirror, unharmed
            liar.set(Fault("corrupt"))
        faulted = liar.faulted
        reg.clear_access_log()
        assert _run_hashes(env, ref) == _expected()
        assert lies_from == "the pull" or liar.faulted > faulted, "the fills asked the mirror first"
        # The origin served ranges of its own, beside those it served the mirror: more ranges
        # than the mirror passed on.
        _wait_for("fill ranges in the origin's log", lambda: len(_ranges(reg, layers)) > liar.faulted - faulted)


def test_a_shared_layer_fills_from_the_registry_of_the_image_run(tmp_path: Path, registry: Registry,
                                                                  images: dict[str, str], origin) -> None:
    first, ref_a, layers = origin
    with Registry() as second:
        ref_b, layers_b = _copy_image(registry, images["python:esgz"], second, "py2", label="b")
        assert layers_b == layers
        env = _env(tmp_path, "")
        _lazyshim(env, "pull", ref_a)  # the layers come from the first registry
        _lazyshim(env, "pull", ref_b)  # another image, same layers: nothing of them is fetched again
        assert _ranges(second, layers) == []
        first.stop()
        assert _run_hashes(env, ref_b) == _expected()
        _wait_for("fill ranges in the second registry's log", lambda: len(_ranges(second, layers)) > 0)


@pytest.mark.parametrize("conf, message", [
    ('[[registry]]\nlocation = "127.0.0.1:1"\nblocked = true\n', "registry 127.0.0.1:1 is blocked in "),
    ('[[registry]]\nlocation = "127.0.0.1:1"\ninsecure = "yes"\n', "insecure must be true or false"),
    ("[[registry]\n", "not valid TOML"),
])
def test_a_blocked_registry_or_a_broken_conf_is_one_line(tmp_path: Path, conf: str, message: str) -> None:
    env = _env(tmp_path, conf)
    p = subprocess.run(LAZYSHIM + ["pull", "127.0.0.1:1/app:1"], env=dict(os.environ, **env), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith("lazyshim: ") and message in p.stderr and p.stderr.count("\n") == 1, p.stderr
