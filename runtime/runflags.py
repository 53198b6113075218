"""podman's `run` flags, read into OCI config pieces: volumes, mounts, env files, limits.

Each parser takes the user's string and returns what goes into config.json, or raises a
`LazyshimError` that names the flag and the value: a bad flag never reaches the delegate.
"""

from __future__ import annotations

import os

from shim.errors import LazyshimError

MAX_ENV_FILE = 1 << 20
CPU_PERIOD = 100_000
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _bind(src: str, dst: str, readonly: bool, flag: str) -> dict:
    if not src.startswith("/"):
        raise LazyshimError(f"{flag}: {src!r}: only host paths (absolute) are supported, not named volumes")
    if not os.path.exists(src):
        raise LazyshimError(f"{flag}: {src}: no such file or directory")
    if not dst.startswith("/"):
        raise LazyshimError(f"{flag}: {dst!r}: the container path must be absolute")
    return {"destination": os.path.normpath(dst), "type": "bind", "source": os.path.realpath(src),
            "options": ["rbind", "ro" if readonly else "rw"]}


def volume(spec: str) -> dict:
    """`-v SRC:DST[:ro|rw]` (podman's bind form)."""
    parts = spec.split(":")
    if len(parts) == 2:
        parts.append("")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise LazyshimError(f"-v {spec!r}: expected SRC:DST[:ro]")
    opts = [o for o in parts[2].split(",") if o]
    bad = [o for o in opts if o not in ("ro", "rw", "z", "Z")]
    if bad:
        raise LazyshimError(f"-v {spec!r}: unsupported option {bad[0]!r} (ro, rw)")
    return _bind(parts[0], parts[1], "ro" in opts, "-v")


def mount(spec: str) -> dict:
    """`--mount type=bind|tmpfs,source=...,destination=...[,ro][,tmpfs-size=..][,tmpfs-mode=..]`."""
    fields: dict[str, str] = {}
    for item in spec.split(","):
        k, eq, v = item.partition("=")
        k = k.strip()
        if k in ("ro", "readonly") and not eq:
            v = "true"
        fields[k] = v
    kind = fields.pop("type", "")
    src = fields.pop("source", None) or fields.pop("src", None) or ""
    dst = fields.pop("destination", None) or fields.pop("dst", None) or fields.pop("target", None) or ""
    readonly = (fields.pop("ro", None) or fields.pop("readonly", None) or "false").lower() in ("true", "1", "")
    if not dst:
        raise LazyshimError(f"--mount {spec!r}: destination= is required")
    if kind == "bind":
        if fields:
            raise LazyshimError(f"--mount {spec!r}: unsupported option {next(iter(fields))!r}")
        return _bind(src, dst, readonly, "--mount")
    if kind == "tmpfs":
        opts = ["nosuid", "nodev"] + (["ro"] if readonly else [])
        size, mode = fields.pop("tmpfs-size", None), fields.pop("tmpfs-mode", None)
        if fields:
            raise LazyshimError(f"--mount {spec!r}: unsupported option {next(iter(fields))!r}")
        if size:
            opts.append(f"size={memory(size)}")
        if mode:
            if not all(c in "01234567" for c in mode):
                raise LazyshimError(f"--mount {spec!r}: tmpfs-mode must be octal")
            opts.append(f"mode={mode}")
        if not dst.startswith("/"):
            raise LazyshimError(f"--mount {spec!r}: the container path must be absolute")
        return {"destination": os.path.normpath(dst), "type": "tmpfs", "source": "tmpfs", "options": opts}
    raise LazyshimError(f"--mount {spec!r}: type must be bind or tmpfs")


def env_file(path: str) -> list[str]:
    """KEY=VALUE lines; `#` comments and blank lines skipped; a bare KEY takes our value."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_ENV_FILE + 1)
    except OSError as e:
        raise LazyshimError(f"--env-file {path}: {e.strerror}") from e
    if len(data) > MAX_ENV_FILE:
        raise LazyshimError(f"--env-file {path}: larger than {MAX_ENV_FILE} bytes")
    out = []
    for n, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, _ = line.partition("=")
        if not key or any(c.isspace() for c in key):
            raise LazyshimError(f"--env-file {path}:{n}: not KEY=VALUE")
        if eq:
            out.append(line)
        elif key in os.environ:
            out.append(f"{key}={os.environ[key]}")
    return out


def memory(value: str, what: str = "size", zero: bool = False) -> int:
    """`512m`, `1g`, `1048576`: bytes (`0` too where `zero`).  `what` names the flag or
    setting in the error."""
    v = value.strip().lower()
    num, unit = v.rstrip("bkmg"), v[len(v.rstrip("bkmg")):]
    if unit.endswith("b") and len(unit) == 2:
        unit = unit[0]
    try:
        n = float(num)
    except ValueError:
        n = -1
    if unit not in _UNITS or not (0 <= n if zero else 0 < n) or not n < 1 << 62:  # also refuses nan and inf
        raise LazyshimError(f"invalid {what} {value[:40]!r} (e.g. 512m, 1g)")
    return int(n * _UNITS[unit])


def cpus(value: str) -> tuple[int, int]:
    """`1.5` CPUs as a CFS (quota, period)."""
    try:
        n = float(value)
    except ValueError:
        n = 0
    if not 0 < n <= 1024:
        raise LazyshimError(f"--cpus {value!r}: a number of CPUs, e.g. 0.5 or 2")
    return int(n * CPU_PERIOD), CPU_PERIOD


READ_ONLY_TMPFS = ("/tmp", "/var/tmp", "/run")


def apply(config: dict, *, mounts: list[dict], memory_limit: int | None, cpu: tuple[int, int] | None,
          read_only: bool) -> None:
    """Put the flags' pieces into a built config (podman's --read-only keeps tmpfs on
    /tmp, /var/tmp and /run, as its --read-only-tmpfs default does)."""
    taken = {m["destination"] for m in mounts}
    if read_only:
        config["root"]["readonly"] = True
        mounts = mounts + [{"destination": d, "type": "tmpfs", "source": "tmpfs",
                            "options": ["nosuid", "nodev", "mode=1777"]} for d in READ_ONLY_TMPFS if d not in taken]
    config["mounts"] = [m for m in config["mounts"] if m["destination"] not in taken] + mounts
    resources = config["linux"].setdefault("resources", {})
    if memory_limit is not None:
        resources["memory"] = {"limit": memory_limit}
    if cpu is not None:
        resources["cpu"] = {"quota": cpu[0], "period": cpu[1]}


def exit_code_of_delegate_error(msg: str) -> int:
    """podman's codes for a container that could not start: 127 no such command, 126 not
    executable, 125 anything else."""
    if "exec: " in msg or "exec format error" in msg:
        if "not found" in msg or "no such file" in msg:
            return 127
        if "permission denied" in msg or "exec format error" in msg:
            return 126
    return 125
