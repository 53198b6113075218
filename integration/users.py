"""The ordinary user that rootless tests and benchmarks run as."""

from __future__ import annotations

import pwd
import subprocess
from pathlib import Path

USER = "lazyshim-test"


def ensure_user() -> pwd.struct_passwd:
    """Create the user (once) with a subuid/subgid range, as a laptop user would have."""
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
        pw = pwd.getpwnam(USER)
    for f in ("/etc/subuid", "/etc/subgid"):
        text = Path(f).read_text() if Path(f).exists() else ""
        if not any(line.split(":")[0] == USER for line in text.splitlines()):
            with open(f, "a") as out:
                out.write(f"{USER}:300000:65536\n")
    return pw
