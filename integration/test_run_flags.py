"""`lazyshim run` flags and container verbs as podman users know them, against real runc,
real overlayfs and the real registry."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from integration.lazyenv import LAZYSHIM, Env, poll
from integration.registry import Registry

HELLO = "hello from the app layer"


@pytest.fixture
def env(new_env, images: dict[str, str]) -> Env:
    e = new_env()
    e("pull", images["busybox:esgz"])
    return e


@pytest.fixture
def bb(images: dict[str, str]) -> str:
    return images["busybox:esgz"]


def test_volume_is_visible_and_ro_is_read_only(env: Env, bb: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("from the host\n")
    script = "cat /data/in.txt; echo w > /data/out.txt; echo rc=$?"
    p = env("run", "--rm", "-v", f"{data}:/data:ro", bb, "sh", "-c", script)
    assert "from the host" in p.stdout and "rc=1" in p.stdout, p.stdout + p.stderr
    assert not (data / "out.txt").exists()
    p = env("run", "--rm", "-v", f"{data}:/data", bb, "sh", "-c", script)
    assert "rc=0" in p.stdout and (data / "out.txt").read_text() == "w\n"


def test_mount_bind_and_tmpfs(env: Env, bb: str, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("bound\n")
    p = env("run", "--rm", "--mount", f"type=bind,source={tmp_path / 'f'},destination=/etc/bound,ro",
            "--mount", "type=tmpfs,destination=/scratch,tmpfs-size=1m", bb,
            "sh", "-c", "cat /etc/bound; grep ' /scratch ' /proc/mounts; echo x > /etc/bound; echo rc=$?")
    assert p.stdout.startswith("bound\n") and "tmpfs /scratch tmpfs" in p.stdout and "size=1024k" in p.stdout
    assert "rc=1" in p.stdout


def test_env_file_hostname_and_read_only(env: Env, bb: str, tmp_path: Path) -> None:
    ef = tmp_path / "env"
    ef.write_text("# comment\nA=from-file\nB=file\n\n")
    p = env("run", "--rm", "--env-file", str(ef), "-e", "B=flag", "--hostname", "box1", "--read-only", bb,
            "sh", "-c", "echo $A $B $(hostname); touch /x; echo root=$?; touch /tmp/x; echo tmp=$?")
    lines = p.stdout.splitlines()
    assert lines[0] == "from-file flag box1"
    assert "root=1" in p.stdout and "tmp=0" in p.stdout


@pytest.mark.parametrize("argv, code", [
    (["sh", "-c", "exit 3"], 3),
    (["/no/such/command"], 127),
    (["/etc/passwd"], 126),
])
def test_exit_codes_like_podman(env: Env, bb: str, argv: list[str], code: int) -> None:
    p = env("run", "--rm", bb, *argv, check=False)
    assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr


def test_own_errors_are_125(env: Env, bb: str) -> None:
    for argv in (["-v", "relative:/x", bb, "true"], ["--memory", "lots", bb, "true"],
                 ["--pull", "never", bb.rsplit(":", 1)[0] + ":nosuchtag", "true"],
                 ["--mount", "type=volume,destination=/x", bb, "true"]):
        p = env("run", "--rm", *argv, check=False)
        assert p.returncode == 125, (argv, p.stderr)
        assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("lazyshim: "), p.stderr


def test_pull_always_asks_the_registry_again(env: Env, bb: str, registry: Registry) -> None:
    repo = bb.split("/", 1)[1].split(":")[0]
    registry.clear_access_log()
    env("run", "--rm", "--pull", "missing", bb, "true")
    env("run", "--rm", "--pull", "always", bb, "true")
    poll(lambda: any(f"/v2/{repo}/manifests/" in e.path for e in registry.access_log()), "a manifest request",
         timeout=10)


def test_detached_container_logs_ps_exec_stop_rm(env: Env, bb: str) -> None:
    name = f"det-{os.getpid()}"
    p = env("run", "-d", "--name", name, "--memory", "64m", "--cpus", "0.5", bb, "sh", "-c",
            "echo started; cat /app/hello.txt; trap 'echo stopping; exit 0' TERM; sleep 300 & wait")
    assert p.stdout.strip() == name and p.returncode == 0, p.stderr
    assert poll(lambda: HELLO in env("logs", name).stdout, "the log")
    assert env("logs", name).stdout.startswith("started\n")
    rows = json.loads(env("ps", "--format", "json").stdout)
    assert [(r["Id"], r["State"]) for r in rows] == [(name, "running")]
    assert env("ps", "-q").stdout.split() == [name]
    # Limits reached the container's cgroups (v1 hierarchies on this host).
    init = (env.store / "containers" / name / "init.pid").read_text()
    groups = dict(line.split(":", 2)[1:] for line in Path(f"/proc/{init}/cgroup").read_text().splitlines())
    if "memory" in groups:
        assert int(Path(f"/sys/fs/cgroup/memory{groups['memory']}/memory.limit_in_bytes").read_text()) == 64 << 20
        cpu = Path(f"/sys/fs/cgroup/cpu{groups.get('cpu') or groups.get('cpu,cpuacct')}/cpu.cfs_quota_us")
        assert int(cpu.read_text()) == 50000
    # exec by a unique prefix of the name; its opens are filled by the supervisor.
    ex = env("exec", name[:5], "sh", "-c", "sha256sum /app/random.bin | cut -c1-8; exit 4", check=False)
    assert ex.returncode == 4 and len(ex.stdout.strip()) == 8, ex.stderr
    running = env("rm", name, check=False)
    assert running.returncode == 1 and "running" in running.stderr
    assert env("stop", "-t", "20", name).stdout.strip() == name
    assert "stopping" in env("logs", name).stdout
    rows = json.loads(env("ps", "-a", "--format", "json").stdout)
    assert [(r["State"], r["ExitCode"]) for r in rows] == [("exited", 0)]
    assert env("ps", "-q").stdout == ""
    assert env.delegate_list() == "" and env.mounts() == [] and env.state_dirs() == []
    env("rm", name)
    assert env("ps", "-a", "-q").stdout == "" and not (env.store / "containers" / name).exists()


def test_rm_force_and_detached_rm(env: Env, bb: str) -> None:
    name = f"rmf-{os.getpid()}"
    env("run", "-d", "--rm", "--name", name, bb, "sleep", "300")
    assert env("ps", "-q").stdout.split() == [name]
    env("rm", "-f", name)
    assert env("ps", "-a", "-q").stdout == ""
    env.assert_nothing_left(name)


def test_detached_start_failure_is_reported_by_run(env: Env, bb: str) -> None:
    p = env("run", "-d", "--rm", bb, "/no/such/command", check=False)
    assert p.returncode == 127 and ("no such file" in p.stderr.lower() or "not found" in p.stderr), p.stderr
    assert env("ps", "-a", "-q").stdout == ""
    assert env.delegate_list() == "" and env.mounts() == []


def test_unknown_container_is_one_line(env: Env) -> None:
    for verb in (["logs"], ["stop"], ["rm"], ["exec"]):
        p = env(*verb, "nosuch", *(["true"] if verb == ["exec"] else []), check=False)
        assert p.returncode != 0 and "Traceback" not in p.stderr, (verb, p.stderr)
        if verb != ["exec"]:  # exec of an unknown id is runc's (one line, its own words)
            assert "no container" in p.stderr, p.stderr



def test_config_file_and_info(env: Env, bb: str, tmp_path: Path) -> None:
    """The user's config file names the store; the environment still wins; info says which."""
    xdg = tmp_path / "xdg"
    (xdg / "lazyshim").mkdir(parents=True)
    (xdg / "lazyshim" / "lazyshim.toml").write_text(f'root = "{env.store}"\nregistry_retries = 2\n')
    cfg_env = {k: v for k, v in env.env.items() if k != "LAZYSHIM_ROOT"} | {"XDG_CONFIG_HOME": str(xdg)}
    p = subprocess.run(LAZYSHIM + ["images"], env=cfg_env, capture_output=True, text=True, timeout=60)
    assert bb.split("/", 1)[1].split(":")[0] in p.stdout, p.stderr
    p = subprocess.run(LAZYSHIM + ["info", "--format", "json"], env=cfg_env | {"LAZYSHIM_REGISTRY_RETRIES": "7"},
                       capture_output=True, text=True, timeout=60)
    doc = json.loads(p.stdout)
    assert doc["settings"]["root"] == {"value": str(env.store), "source": str(xdg / "lazyshim" / "lazyshim.toml")}
    assert doc["settings"]["registry_retries"] == {"value": "7", "source": "LAZYSHIM_REGISTRY_RETRIES"}
    assert doc["kernel"]["seccomp_user_notif"] is True and doc["delegate"]["path"]
    (xdg / "lazyshim" / "lazyshim.toml").write_text("bogus = 1\n")
    p = subprocess.run(LAZYSHIM + ["images"], env=cfg_env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "unknown key 'bogus'" in p.stderr and "Traceback" not in p.stderr


def test_listings_as_json_and_templates(env: Env, bb: str) -> None:
    imgs = json.loads(env("images", "--format", "json").stdout)
    assert [i["Repository"] for i in imgs] == [bb] and imgs[0]["Id"].startswith("sha256:") and imgs[0]["Size"] > 0
    assert env("images", "--format", "{{.ID}} {{.Layers}}").stdout == f"{imgs[0]['Id'][7:19]} {imgs[0]['Layers']}\n"
    assert env("images", "-q").stdout == imgs[0]["Id"][7:19] + "\n"
    df = {r["Type"]: r for r in json.loads(env("df", "--format", "json").stdout)}
    assert df["Images"]["Total"] == 1 and df["Layers"]["Total"] == imgs[0]["Layers"]
    assert 0 <= df["Fetched"]["Size"] < df["Layers"]["Size"] * 10
    name = f"fmt-{os.getpid()}"
    env("run", "--name", name, bb, "true")
    assert env("ps", "-a", "--format", "{{.Names}} {{.Status}}").stdout == f"{name} Exited (0)\n"
    assert json.loads(env("inspect", "--format", "json", bb).stdout)["name"] == bb
    bad = env("images", "--format", "{{.Nope}}", check=False)
    assert bad.returncode == 1 and "no field 'Nope'" in bad.stderr


def test_pull_and_fetch_progress(new_env, images: dict[str, str]) -> None:
    """Not a terminal: one line per layer on stderr, the image id alone on stdout.  Under a
    pty: the fetch's line for a layer is rewritten in place as its files arrive."""
    import pty

    env = new_env()
    ref = images["python:esgz"]
    p = env("pull", ref)
    image_id = p.stdout.strip()
    assert image_id.startswith("sha256:") and "\n" not in image_id
    layers = [line for line in p.stderr.splitlines() if line.startswith("layer ")]
    assert len(layers) >= 2 and all("files" in line for line in layers), p.stderr
    assert "lower" not in p.stdout and "lower " in env("pull", "--verbose", ref).stdout
    assert env("pull", "-q", ref).stdout == image_id + "\n" and env("pull", "-q", ref).stderr == ""

    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(LAZYSHIM + ["fetch", ref], env=env.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        out = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the pty
                break
            if not chunk:
                break
            out += chunk
        stdout, _ = proc.communicate(timeout=300)
    finally:
        os.close(master)
    assert proc.returncode == 0 and b"filled" in stdout
    shown = [seg.decode() for seg in out.split(b"\r\x1b[K") if seg.startswith(b"layer ")]
    per_layer: dict[str, set[str]] = {}
    for line in shown:
        per_layer.setdefault(line.split("  ")[0], set()).add(line.strip())
    assert len(per_layer) == len(layers), shown
    full = "[" + "=" * 24 + "]"
    for lines in per_layer.values():  # each layer's line starts unfilled and is rewritten until full
        assert any(full in v for v in lines) and any(full not in v for v in lines), per_layer
