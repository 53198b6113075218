"""Build an OCI runtime config for a standalone `lazyshim run` from an image config.

The same defaults `runc spec` produces (namespaces, mounts, masked paths, capabilities),
filled with the image's entrypoint, command, environment, working dir and user.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shim.errors import LazyshimError

DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ImageSettings:
    """What a container takes from its image's config, checked: the config comes from a
    registry and any field may have any JSON type."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    user: str = ""
    workdir: str = ""


def image_settings(image_config: object, image: str) -> ImageSettings:
    """The image config's process settings; LazyshimError (one line) for a field of the wrong type."""
    if not isinstance(image_config, dict):
        raise LazyshimError(f"{image}: image config is {_kind(image_config)}, not a JSON object")
    cfg = image_config.get("config")
    if cfg is None:
        return ImageSettings()
    if not isinstance(cfg, dict):
        raise LazyshimError(f"{image}: image config field config is {_kind(cfg)}, not an object")

    def strings(key: str) -> list[str]:
        v = cfg.get(key)
        if v is None:
            return []
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise LazyshimError(f"{image}: image config field config.{key} is {_kind(v)}, not a list of strings")
        return list(v)

    def string(key: str) -> str:
        v = cfg.get(key)
        if v is None:
            return ""
        if not isinstance(v, str):
            raise LazyshimError(f"{image}: image config field config.{key} is {_kind(v)}, not a string")
        return v

    env = strings("Env")
    nameless = next((e for e in env if not e.partition("=")[0]), None)
    if nameless is not None:
        raise LazyshimError(f"{image}: image config field config.Env holds {nameless[:40]!r}, a variable without "
                            "a name")
    workdir = string("WorkingDir")
    if workdir and not workdir.startswith("/"):
        raise LazyshimError(f"{image}: image config field config.WorkingDir must be an absolute path, not {workdir!r}")
    return ImageSettings(strings("Entrypoint"), strings("Cmd"), env, string("User"), workdir)


def _kind(v: object) -> str:
    if isinstance(v, list):
        return "a list" if all(isinstance(x, str) for x in v) else "a list with non-strings"
    return {dict: "an object", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(v), type(v).__name__)


def process_args(image: ImageSettings, cmd: list[str], entrypoint: list[str] | None = None) -> list[str]:
    ep = entrypoint if entrypoint is not None else list(image.entrypoint)
    return ep + (cmd if cmd else ([] if entrypoint is not None else list(image.cmd)))


def merged_env(image: ImageSettings, extra: list[str]) -> list[str]:
    env: dict[str, str] = {}
    for item in image.env + extra:
        k, _, v = item.partition("=")
        env[k] = v
    env.setdefault("PATH", DEFAULT_PATH)
    return [f"{k}={v}" for k, v in env.items()]


def build_spec(*, rootfs: str, args: list[str], env: list[str], cwd: str, uid: int, gid: int,
               hostname: str, terminal: bool, network: str, readonly: bool = False) -> dict:
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if network != "host":
        namespaces.append({"type": "network"})
    caps = list(DEFAULT_CAPS)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": uid, "gid": gid},
            "args": args,
            "env": env,
            "cwd": cwd or "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": rootfs, "readonly": readonly},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ] + ([{"destination": "/etc/resolv.conf", "type": "bind", "source": "/etc/resolv.conf",
               "options": ["rbind", "ro"]}] if network == "host" else []),
        "linux": {
            "namespaces": namespaces,
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi",
            ],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }
