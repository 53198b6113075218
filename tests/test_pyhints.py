"""What an arrived Python module imports is filled next, found as the interpreter would find it."""

from __future__ import annotations

import importlib.util
import marshal
import os
import threading
from pathlib import Path

import pytest

from shim.errors import LazyshimError
from shim.supervisor.pyhints import ModuleHints

STDLIB = "usr/lib/python3.11"
SITE = "usr/lib/python3/dist-packages"


def _pyc(source: str) -> bytes:
    return importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(compile(source, "m.py", "exec"))


SUB = "from pkg import _ext\nimport _speed\nimport not_in_the_image\nimport os\n"


def _tree(root: Path) -> None:
    files = {
        f"{STDLIB}/os.py": "import stat\n",
        f"{STDLIB}/stat.py": "",
        f"{STDLIB}/json/__init__.py": "from .decoder import JSONDecoder\n",
        f"{STDLIB}/json/decoder.py": "import re\n",
        f"{STDLIB}/lib-dynload/_speed.cpython-311-x86_64-linux-gnu.so": "",
        f"{SITE}/pkg/__init__.py": "from . import sub\nimport json\n\ndef later():\n    import unused\n",
        f"{SITE}/pkg/sub.py": SUB,
        f"{SITE}/pkg/_ext.cpython-311-x86_64-linux-gnu.so": "",
        f"{SITE}/unused.py": "",
        "app/main.py": "import pkg\n",
    }
    for name, text in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    # a package with bytecode beside its source: the interpreter opens the .pyc
    (root / SITE / "pkg/__pycache__").mkdir()
    (root / SITE / "pkg/__pycache__/sub.cpython-311.pyc").write_bytes(_pyc(SUB))


class Image:
    """Every file is a placeholder until filled; a fill of one in `fail` raises."""

    def __init__(self, root: Path, fail: frozenset[str] = frozenset()) -> None:
        self.placeholders = {"/" + str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
        self.filled: list[str] = []
        self.fail = fail
        self.lock = threading.Lock()

    def lookup_path(self, root_fd: int, path: bytes):
        p = os.path.normpath(path.decode())
        with self.lock:
            return ("filler", p) if p in self.placeholders else None

    def fill(self, filler, path: str) -> None:
        if path in self.fail:
            raise LazyshimError(f"registry gone for {path}")
        with self.lock:
            self.placeholders.discard(path)
            self.filled.append(path)


@pytest.fixture
def root(tmp_path: Path):
    _tree(tmp_path)
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    yield tmp_path, fd
    os.close(fd)


def _walk(root_fd: int, image: Image, arrived: str, logs: list[str] | None = None) -> ModuleHints:
    image.placeholders.discard(arrived)  # it has just been filled
    hints = ModuleHints(image.lookup_path, image.fill, (logs if logs is not None else []).append)
    hints.arrived_in(root_fd, arrived)
    assert hints.wait_idle(30)
    hints.close()
    return hints


def test_an_arrived_script_has_what_it_imports_filled_and_theirs(root) -> None:
    path, fd = root
    image = Image(path)
    hints = _walk(fd, image, "/app/main.py")
    assert set(image.filled) == {
        f"/{SITE}/pkg/__init__.py",
        f"/{SITE}/pkg/__pycache__/sub.cpython-311.pyc",  # not sub.py: the interpreter reads the bytecode
        f"/{SITE}/pkg/_ext.cpython-311-x86_64-linux-gnu.so",
        f"/{STDLIB}/lib-dynload/_speed.cpython-311-x86_64-linux-gnu.so",
        f"/{STDLIB}/json/__init__.py", f"/{STDLIB}/json/decoder.py",
        f"/{STDLIB}/os.py", f"/{STDLIB}/stat.py",
    }
    assert f"/{SITE}/unused.py" not in image.filled  # imported in a function: maybe never
    assert hints.hinted == len(image.filled)


def test_a_module_already_in_place_is_walked_through_not_filled(root) -> None:
    path, fd = root
    image = Image(path)
    image.placeholders.discard(f"/{SITE}/pkg/__init__.py")  # a readahead brought it
    _walk(fd, image, "/app/main.py")
    assert f"/{SITE}/pkg/__init__.py" not in image.filled
    assert f"/{STDLIB}/json/__init__.py" in image.filled


def test_an_unfilled_file_is_never_read_for_its_imports(root) -> None:
    path, fd = root
    image = Image(path)
    hints = ModuleHints(image.lookup_path, image.fill, [].append)
    hints.arrived_in(fd, "/app/main.py")  # still a placeholder: its bytes are not the image's
    assert hints.wait_idle(30)
    assert image.filled == []


def test_a_failed_fill_is_logged_and_ends_only_its_branch(root) -> None:
    path, fd = root
    image = Image(path, fail=frozenset({f"/{STDLIB}/json/__init__.py"}))
    logs: list[str] = []
    _walk(fd, image, f"/{SITE}/pkg/__init__.py", logs)
    assert f"/{STDLIB}/json/decoder.py" not in image.filled
    assert f"/{SITE}/pkg/__pycache__/sub.cpython-311.pyc" in image.filled
    assert any("registry gone" in line for line in logs)


def test_names_in_a_module_never_leave_the_tree(root, tmp_path_factory) -> None:
    path, fd = root
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.py").write_text("")
    (path / "app/evil.py").write_text(f"import ..{outside.name}\nfrom .. import etc\n"
                                      "from ...................... import passwd\n")
    image = Image(path)
    _walk(fd, image, "/app/evil.py")
    assert image.filled == []
