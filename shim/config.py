"""lazyshim's configuration, read in one place: environment over config files over defaults.

    /etc/lazyshim/lazyshim.toml                  the system's
    $XDG_CONFIG_HOME/lazyshim/lazyshim.toml      the user's (default ~/.config/...), over the system's
    LAZYSHIM_<KEY> environment variables         over both

Top-level TOML keys (all optional):

    root = "/var/lib/lazyshim"          # the store                         LAZYSHIM_ROOT
    runtime_dir = "/run/lazyshim"       # per-container state               LAZYSHIM_RUNTIME_DIR
    delegate = "runc"                   # the OCI runtime handed to         LAZYSHIM_DELEGATE
    background_fetch = "all"            # none | prioritized | all          LAZYSHIM_BACKGROUND_FETCH
    insecure_registries = ["reg:5000"]  # plain HTTP allowed                LAZYSHIM_INSECURE_REGISTRIES (a,b)
    registry_retries = 3                #                                   LAZYSHIM_REGISTRY_RETRIES
    registry_timeout = 30               # seconds per network operation     LAZYSHIM_REGISTRY_TIMEOUT
    fetch_timeout = 30                  # seconds for one fill              LAZYSHIM_FETCH_TIMEOUT
    store_max_size = "20g"              # file data cap for `lazyshim gc`   LAZYSHIM_STORE_MAX_SIZE
    trap = "auto"                       # notify | ptrace | auto            LAZYSHIM_TRAP
    big_file_threshold = 16777216       # bytes; bigger chunked files are   LAZYSHIM_BIG_FILE_THRESHOLD
                                        # served chunk by chunk (0: off)
    profiles = "on"                     # learn and use start-up profiles   LAZYSHIM_PROFILES (on|off)

Values come back as the strings an environment variable would hold, so each reader keeps
its own parsing and range checks.  Imported on every runc-style call (`state`): os only,
and `tomllib` only when a config file exists.
"""

from __future__ import annotations

import os

KEYS = ("root", "runtime_dir", "delegate", "background_fetch", "insecure_registries", "registry_retries",
        "registry_timeout", "fetch_timeout", "store_max_size", "trap", "big_file_threshold", "profiles")
SYSTEM_FILE = "/etc/lazyshim/lazyshim.toml"
MAX_FILE = 1 << 20

_files_cache: dict[str, tuple[str, str]] | None = None


def env_name(key: str) -> str:
    return "LAZYSHIM_" + key.upper()


def user_file() -> str:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "lazyshim", "lazyshim.toml")


def files() -> list[str]:
    """The config files that are read, lowest precedence first."""
    return [SYSTEM_FILE, user_file()]


def get(key: str) -> str | None:
    """The effective value of `key` (a string, as in the environment), or None."""
    env = os.environ.get(env_name(key))
    if env:
        return env
    hit = _from_files().get(key)
    return hit[0] if hit else None


def effective() -> dict[str, tuple[str | None, str]]:
    """Every key: (value, where it came from: the variable's name, a file, or "default")."""
    out: dict[str, tuple[str | None, str]] = {}
    fv = _from_files()
    for key in KEYS:
        env = os.environ.get(env_name(key))
        if env:
            out[key] = (env, env_name(key))
        elif key in fv:
            out[key] = fv[key]
        else:
            out[key] = (None, "default")
    return out


def _from_files() -> dict[str, tuple[str, str]]:
    global _files_cache
    if _files_cache is None:
        values: dict[str, tuple[str, str]] = {}
        for path in files():
            if os.path.exists(path):
                for k, v in _read(path).items():
                    values[k] = (v, path)
        _files_cache = values
    return _files_cache


def reload() -> None:
    """Forget what was read (tests, and a long-lived process whose files changed)."""
    global _files_cache
    _files_cache = None


def _read(path: str) -> dict[str, str]:
    import tomllib

    from .errors import LazyshimError

    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
        if len(data) > MAX_FILE:
            raise LazyshimError(f"config {path}: larger than {MAX_FILE} bytes")
        doc = tomllib.loads(data.decode("utf-8"))
    except OSError as e:
        raise LazyshimError(f"config {path}: {e.strerror}") from e
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise LazyshimError(f"config {path}: {e}") from e
    out: dict[str, str] = {}
    for k, v in doc.items():
        if k not in KEYS:
            raise LazyshimError(f"config {path}: unknown key {k!r} (known: {', '.join(KEYS)})")
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            out[k] = ",".join(v)
        elif isinstance(v, (str, int, float)) and not isinstance(v, bool):
            out[k] = str(v)
        else:
            raise LazyshimError(f"config {path}: {k} must be a string, a number or a list of strings")
    return out
