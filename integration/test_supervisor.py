"""The supervisor against the traps in DESIGN.md, with real runc, overlayfs and registry."""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

from integration.images import RANDOM_FILE_SIZE, build_and_push, fetch_manifest
from integration.registry import Registry
from integration.storeview import layer_trees, layout_name
from integration.test_lazy_run import LAZYSHIM, lazyshim, trap  # noqa: F401 - a fixture
from shim.store.layout import Store
from shim.store.layouts import load_meta

RANDOM_SHA = hashlib.sha256(random.Random(20240601).randbytes(RANDOM_FILE_SIZE)).hexdigest()
HELLO = "hello from the app layer\n"
IMAGE_PASSWD = "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


def _run(store: Path, ref: str, script: str, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return lazyshim(store, "run", "--rm", "--no-background-fetch", *extra, ref, "sh", "-c", script, check=check)


@pytest.mark.usefixtures("trap")
def test_copy_up_syscalls_never_copy_an_empty_placeholder(store: Path, images: dict[str, str]) -> None:
    """chmod/touch/rename/truncate make overlayfs copy a lower file up: each must see the
    file filled first, or the zeros would be copied and the content lost for good."""
    script = (
        "chmod 600 /app/hello.txt && cat /app/hello.txt; "
        "touch /app/hello.sh && sha256sum /app/hello.sh; "
        "mv /app/random.bin /random.moved && sha256sum /random.moved; "
        "truncate -s 5 /app/hello-hardlink.txt && cat /app/hello-hardlink.txt; echo; "
    )
    p = _run(store, images["busybox:esgz"], script)
    lines = p.stdout.splitlines()
    assert lines[0] == HELLO.strip()
    hello_sh = hashlib.sha256(b"#!/bin/sh\necho hello from busybox sh\n").hexdigest()
    assert lines[1].split()[0] == hello_sh
    assert lines[2].split()[0] == RANDOM_SHA
    assert lines[3] == "hello"


@pytest.mark.usefixtures("trap")
def test_absolute_symlinks_resolve_inside_the_container(store: Path, images: dict[str, str]) -> None:
    p = _run(store, images["busybox:esgz"], "cat /app/passwd-abs-link")
    assert p.stdout == IMAGE_PASSWD  # the image's file, never the host's


@pytest.mark.usefixtures("trap")
def test_hostile_container_cannot_reach_host_files(store: Path, images: dict[str, str], tmp_path: Path) -> None:
    """Links the container makes to host paths resolve in the container; nothing outside the
    store is read or written by the supervisor on its behalf."""
    canary = tmp_path / "canary"
    canary.write_bytes(b"host secret\n")
    before = canary.stat()
    script = (
        f"ln -s {canary} /app/evil; cat /app/evil; echo rc=$?; "
        f"ln -s /../../../../{canary} /app/evil2; cat /app/evil2; echo rc=$?; "
        "rm /app/hello.txt && ln -s /proc/1/root/etc/hostname /app/hello.txt; cat /app/hello.txt >/dev/null; "
        "echo done"
    )
    p = _run(store, images["busybox:esgz"], script, check=False)
    assert "host secret" not in p.stdout
    assert p.stdout.count("rc=1") == 2, p.stdout
    after = canary.stat()
    assert (after.st_mtime_ns, after.st_size, canary.read_bytes()) == (before.st_mtime_ns, before.st_size,
                                                                       b"host secret\n")
    # The store's own trees are untouched by what the container did in its upper dir.
    for tree in layer_trees(store):
        assert not (tree / "app/evil").exists()
        if (tree / "app").is_dir():
            assert (tree / "app/hello.txt").exists()


@pytest.mark.usefixtures("trap")
def test_many_threads_open_unfilled_files_each_fetched_once(store: Path, images: dict[str, str],
                                                            registry: Registry) -> None:
    """64 threads open every stdlib file (each twice, concurrently): no deadlock, every byte
    right, no byte fetched twice, and readahead makes fewer requests than files."""
    ref = images["python:esgz"]
    lazyshim(store, "pull", ref)
    registry.clear_access_log()
    script = (
        "import hashlib, json, os, concurrent.futures as cf\n"
        "paths = [os.path.join(d, f) for d, _, fs in os.walk('/usr/lib/python3.11') for f in fs]\n"
        "paths = [p for p in paths if os.path.isfile(p) and not os.path.islink(p)]\n"
        "def h(p):\n"
        "    with open(p, 'rb') as f: return p, hashlib.sha256(f.read()).hexdigest()\n"
        "with cf.ThreadPoolExecutor(64) as ex: out = dict(ex.map(h, paths + paths[::-1]))\n"
        "print(json.dumps(out))\n"
    )
    p = lazyshim(store, "run", "--rm", "--no-background-fetch", ref, "python3", "-B", "-c", script,
                 timeout=300)
    got = json.loads(p.stdout)
    assert len(got) > 500
    wrong = [path for path, digest in got.items()
             if hashlib.sha256(Path(path).read_bytes()).hexdigest() != digest]
    assert not wrong, wrong[:5]
    host, _, rest = ref.partition("/")
    name, _, tag = rest.rpartition(":")
    app = fetch_manifest(host, name, tag)["layers"][-1]["digest"]
    requests = [e for e in registry.blob_requests(app) if e.status == 206]
    marks = (store / "layers" / app.replace(":", "-") / "filled").read_bytes()
    entries = load_meta(Store(store), app).toc.entries
    filled = [entries[i].digest for i in range(len(entries)) if marks[i]]
    if layout_name(store) == "v2":  # identical files share one data object, fetched once
        filled = list(set(filled))
    assert 0 < len(requests) < len(filled), f"{len(requests)} range requests for {len(filled)} filled files"
    blob_size = registry.blob_path(name, app).stat().st_size
    assert sum(e.size for e in requests) <= blob_size, "some bytes were fetched twice"


@pytest.fixture
def private_busybox(tmp_path: Path):
    """A registry of our own, so the test may stop it."""
    with Registry() as reg:
        refs = build_and_push(reg, names=("busybox",), variants=("esgz",))
        yield reg, refs["busybox:esgz"]


class _Container:
    """A `lazyshim run -i` whose stdin the test drives line by line."""

    def __init__(self, store: Path, ref: str, script: str, env: dict[str, str] | None = None) -> None:
        self.name = f"t{os.getpid()}{random.randrange(1 << 30)}"
        self.proc = subprocess.Popen(
            LAZYSHIM + ["run", "--rm", "-i", "--no-background-fetch", "--name", self.name, ref, "sh", "-c", script],
            env=dict(os.environ, LAZYSHIM_ROOT=str(store), **(env or {})),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self._seen = ""

    def expect(self, marker: str, timeout: float = 60) -> str:
        """Read output until it contains marker (bounded: a hang fails the test).  Raw reads:
        a buffered reader could hold the marker while select() waits on an empty pipe."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while marker not in self._seen and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._seen += chunk.decode()
        if marker not in self._seen:
            raise AssertionError(f"no {marker!r} in output: {self._seen!r}")
        head, _, self._seen = self._seen.partition(marker)
        return head + marker

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def finish(self, timeout: float = 60) -> str:
        out, _ = self.proc.communicate(timeout=timeout)
        return self._seen + out


def test_registry_outage_gives_eio_then_fills_resume(store: Path, private_busybox) -> None:
    reg, ref = private_busybox
    lazyshim(store, "pull", ref)
    script = (
        "echo ready; read x; "
        "cat /app/hello.txt 2>&1 || echo OPEN-FAILED; "  # one stream: runc copies stdout and stderr apart
        "sha256sum /bin/busybox >/dev/null && echo FILLED-FILE-OK; "
        "echo waiting; read x; cat /app/hello.txt"
    )
    c = _Container(store, ref, script, env={"LAZYSHIM_FETCH_TIMEOUT": "2"})
    c.expect("ready")
    os.killpg(reg._proc.pid, signal.SIGSTOP)  # the registry hangs: connections accepted, never answered
    try:
        t0 = time.monotonic()
        c.send("go")
        out = c.expect("waiting", timeout=60)
        waited = time.monotonic() - t0
    finally:
        os.killpg(reg._proc.pid, signal.SIGCONT)
    assert "Input/output error" in out and "OPEN-FAILED" in out
    assert "FILLED-FILE-OK" in out
    assert waited < 30, f"an open waited {waited:.1f}s for a dead registry"
    c.send("go")
    assert c.finish().strip() == HELLO.strip()


def test_keeper_death_makes_trapped_syscalls_fail_with_enosys(store: Path, images: dict[str, str]) -> None:
    """Documented behaviour: without keeper and supervisor (killing the keeper, the process
    the runtime started, takes its supervisor along) a container's trapped syscalls fail
    (ENOSYS) instead of reading unfilled placeholders."""
    ref = images["busybox:esgz"]
    lazyshim(store, "pull", ref)
    c = _Container(store, ref, "echo ready; read x; cat /app/hello.txt; echo rc=$?")
    c.expect("ready")
    from runtime.attach import state_dir
    from runtime.stats import stats

    worker = os.pidfd_open(stats(c.name)["pid"])
    try:
        keeper = int((state_dir(c.name) / "supervisor.pid").read_text())
        os.kill(keeper, signal.SIGKILL)
        assert select.select([worker], [], [], 60)[0], "the supervisor outlived its keeper"
    finally:
        os.close(worker)
    c.send("go")
    out = c.finish()
    assert "Function not implemented" in out and "rc=1" in out, out


def _mapped_tables(pid: int) -> set[tuple[str, str, str]]:
    """(device, inode, path) of every layer table the process has mapped."""
    out = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5].endswith("/toc.table"):
            out.add((fields[3], fields[4], fields[5]))
    return out


def test_supervisors_of_one_image_map_the_same_layer_tables(store: Path, images: dict[str, str]) -> None:
    """Two containers of one image: their supervisors read the layers' entries from one
    mapped file each (shared page cache), not from copies decoded per process."""
    from runtime.stats import stats

    ref = images["busybox:esgz"]
    lazyshim(store, "pull", ref)
    cs = [_Container(store, ref, "echo ready; read x; cat /app/hello.txt") for _ in range(2)]
    try:
        for c in cs:
            c.expect("ready")
        mapped = [_mapped_tables(stats(c.name)["pid"]) for c in cs]
    finally:
        for c in cs:
            c.send("go")
    outs = [c.finish() for c in cs]
    lazy = [d for d in (store / "layers").iterdir() if (d / "toc.table").exists() and not (d / "complete").exists()]
    assert lazy and mapped[0] == mapped[1]
    assert {Path(p).parent.name for _, _, p in mapped[0]} >= {d.name for d in lazy}
    assert all(o.strip() == HELLO.strip() for o in outs), outs


def test_background_fetch_fills_every_file(store: Path, images: dict[str, str]) -> None:
    ref = images["python:esgz"]
    lazyshim(store, "pull", ref)
    name = f"bg{os.getpid()}"
    proc = subprocess.Popen(LAZYSHIM + ["run", "--rm", "-i", "--name", name, ref, "python3", "-c", "input()"],
                            env=dict(os.environ, LAZYSHIM_ROOT=str(store)), stdin=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            maps = [(d / "filled").read_bytes() for d in (store / "layers").iterdir()]
            if all(_all_regular_filled(d) for d in (store / "layers").iterdir()):
                break
            time.sleep(0.2)  # polling the store's state with a deadline, not synchronising on time
        else:
            raise AssertionError(f"background fetch did not finish: {[m.count(1) for m in maps]}")
    finally:
        proc.communicate("\n", timeout=60)


def _all_regular_filled(layer_dir: Path) -> bool:
    from shim.store.layouts import read_meta

    meta = read_meta(layer_dir)
    filled = (layer_dir / "filled").read_bytes()
    return all(filled[i] for i in meta.table.data_files())


@pytest.mark.usefixtures("trap")
def test_user_seccomp_profile_keeps_denying(store: Path, images: dict[str, str], tmp_path: Path) -> None:
    """Syscalls we trap are answered with the user's own verdicts: reads allowed, creating
    opens denied by an argument condition, chmod denied outright."""
    o_creat = os.O_CREAT
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [
            {"names": ["openat", "open"], "action": "SCMP_ACT_ERRNO", "errnoRet": 30,  # EROFS
             "args": [{"index": 2, "value": o_creat, "valueTwo": o_creat, "op": "SCMP_CMP_MASKED_EQ"}]},
            {"names": ["chmod", "fchmodat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13},  # EACCES
        ],
    }
    pfile = tmp_path / "profile.json"
    pfile.write_text(json.dumps(profile))
    script = "cat /app/hello.txt; echo x > /newfile; echo create=$?; chmod 600 /app/hello.txt; echo chmod=$?"
    p = _run(store, images["busybox:esgz"], script, "--security-opt", f"seccomp={pfile}", check=False)
    assert HELLO in p.stdout
    assert "create=1" in p.stdout and "chmod=1" in p.stdout, p.stdout + p.stderr
    assert "Read-only file system" in p.stdout + p.stderr
    assert "Permission denied" in p.stdout + p.stderr


@pytest.mark.usefixtures("trap")
def test_opens_left_out_of_the_filter_still_get_the_users_verdict(store: Path, images: dict[str, str],
                                                                 tmp_path: Path) -> None:
    """O_DIRECTORY opens (ls) and O_CREAT|O_EXCL opens (mktemp) are not trapped when the user's
    verdict does not depend on the arguments, and then the kernel must give them the user's own
    verdict: under podman's default profile (deny by default, openat allowed by a rule) they
    work; under a profile that denies O_CREAT opens, mktemp is still denied (trapped whole,
    answered by the supervisor) while ls and a plain read work."""
    script = ("ls /app >/dev/null; echo ls=$?; mktemp >/dev/null; echo mktemp=$?; "
              "cat /app/hello.txt >/dev/null; echo cat=$?")
    default = Path("/usr/share/containers/seccomp.json")
    if default.exists():
        p = _run(store, images["busybox:esgz"], script, "--security-opt", f"seccomp={default}", check=False)
        assert "ls=0" in p.stdout and "mktemp=0" in p.stdout and "cat=0" in p.stdout, p.stdout + p.stderr
    o_creat = os.O_CREAT
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
               "syscalls": [{"names": ["openat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 30,  # EROFS
                             "args": [{"index": 2, "value": o_creat, "valueTwo": o_creat,
                                       "op": "SCMP_CMP_MASKED_EQ"}]}]}
    pfile = tmp_path / "profile.json"
    pfile.write_text(json.dumps(profile))
    p = _run(store, images["busybox:esgz"], script.replace(">/dev/null", ""), "--security-opt", f"seccomp={pfile}",
             check=False)
    assert "ls=0" in p.stdout and "mktemp=1" in p.stdout and "cat=0" in p.stdout, p.stdout + p.stderr
    assert "Read-only file system" in p.stdout + p.stderr


def test_directory_opens_never_reach_the_supervisor(store: Path, images: dict[str, str]) -> None:
    """A shell globbing a directory 200 times (openat O_DIRECTORY, no exec, no other open) adds
    almost nothing to the supervisor's notification count: the filter answers those itself."""
    ref = images["busybox:esgz"]
    lazyshim(store, "pull", ref)
    c = _Container(store, ref, "cat /app/hello.txt; echo ready; read x; "
                               "for i in $(seq 200); do set -- /app/*; done; echo globbed $#; read y")
    c.expect("ready")
    try:
        before = json.loads(lazyshim(store, "stats", c.name).stdout)["notifications"]
        c.send("go")
        c.expect("globbed")
        after = json.loads(lazyshim(store, "stats", c.name).stdout)["notifications"]
    finally:
        c.send("go")
        c.finish()
    assert after - before < 50, (before, after)


@pytest.mark.usefixtures("trap")
def test_stats_reports_fills_of_a_running_container(store: Path, images: dict[str, str]) -> None:
    ref = images["busybox:esgz"]
    lazyshim(store, "pull", ref)
    c = _Container(store, ref, "cat /app/hello.txt; echo ready; read x")
    c.expect("ready")
    try:
        doc = json.loads(lazyshim(store, "stats", c.name).stdout)
    finally:
        c.send("go")
        c.finish()
    assert doc["fills"] >= 1 and doc["files_filled"] >= 1 and doc["bytes_fetched"] > 0
    assert doc["notifications"] >= doc["fills"]
    # Where the start waited: the first on-demand fills, in order, the file the shell read among them.
    waits = doc["first_waits"]
    assert 1 <= len(waits) <= doc["fills"] and "/app/hello.txt" in [w["path"] for w in waits]
    assert all(w["waited"] >= 0 and w["size"] >= 0 for w in waits)
    p = lazyshim(store, "stats", c.name, check=False)
    assert p.returncode == 1 and "does not exist" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.usefixtures("trap")
def test_paths_through_proc_magic_links_are_filled_too(store: Path, images: dict[str, str]) -> None:
    """/proc/self/root/x, /proc/self/cwd/x, /proc/1/root/x and an image-side symlink into
    /proc all reach placeholders; each must be filled, never read as zeros."""
    script = (
        "sha256sum /proc/self/root/app/random.bin; "
        "cd /app && cat /proc/self/cwd/hello.txt; "
        "ln -s /proc/self/root/app/hello.sh /viaproc && cat /viaproc; "
        "cat /proc/1/root/app/suid-script.sh; "
        "echo piped | cat /dev/stdin"
    )
    p = _run(store, images["busybox:esgz"], script)
    assert p.stdout.splitlines() == [
        f"{RANDOM_SHA}  /proc/self/root/app/random.bin",
        HELLO.strip(),
        "#!/bin/sh", "echo hello from busybox sh",
        "#!/bin/sh", "echo suid",
        "piped",
    ]


CHROOT_SCRIPT = """
import hashlib, os
os.chroot('/usr/lib/python3.11')
print(hashlib.sha256(open('/textwrap.py', 'rb').read()).hexdigest())
os.chdir('/json')
print(hashlib.sha256(open('decoder.py', 'rb').read()).hexdigest())
d = os.open('/json', os.O_RDONLY)
print(hashlib.sha256(os.read(os.open('scanner.py', os.O_RDONLY, dir_fd=d), 1 << 20)).hexdigest())
"""


@pytest.mark.usefixtures("trap")
def test_a_task_that_chroots_gets_its_files_filled_in_its_new_root(store: Path, images: dict[str, str]) -> None:
    """chroot is trapped: absolute, cwd- and dirfd-relative paths resolve in the new root,
    so an unfilled file opened there is filled first, never served as a placeholder."""
    p = lazyshim(store, "run", "--rm", "--no-background-fetch", images["python:esgz"], "python3", "-c",
                 CHROOT_SCRIPT, check=False)
    assert p.returncode == 0, p.stderr
    want = [hashlib.sha256(Path(f"/usr/lib/python3.11/{f}").read_bytes()).hexdigest()
            for f in ("textwrap.py", "json/decoder.py", "json/scanner.py")]
    assert p.stdout.split() == want
