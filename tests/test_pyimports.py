"""The import statements a Python module's source or bytecode makes at import time."""

from __future__ import annotations

import importlib.util
import marshal

from hypothesis import given, settings
from hypothesis import strategies as st

from shim.supervisor.pyimports import Import, bytecode_imports, source_imports

MODULE = b'''"""A module."""
from __future__ import annotations
import os, sys as system
import json.decoder
from . import sibling
from .core import (first,
                   second)
from ..up import thing  # a comment
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import never.checked

try:
    import fast
except ImportError:
    import slow

def later():
    import inside_a_function

class Thing:
    import inside_a_class

    def method(self):
        from x import y
import last
'''

EXPECTED = [
    Import(0, "__future__", ("annotations",)),
    Import(0, "os", ()),
    Import(0, "sys", ()),
    Import(0, "json.decoder", ()),
    Import(1, "", ("sibling",)),
    Import(1, "core", ("first", "second")),
    Import(2, "up", ("thing",)),
    Import(0, "typing", ("TYPE_CHECKING",)),
    Import(0, "fast", ()),
    Import(0, "slow", ()),
    Import(0, "last", ()),
]


def _pyc(source: bytes) -> bytes:
    return importlib.util.MAGIC_NUMBER + bytes(12) + marshal.dumps(compile(source, "m.py", "exec"))


def test_source_gives_the_top_level_imports_in_order_without_function_class_or_type_checking_bodies():
    assert source_imports(MODULE) == EXPECTED


def test_bytecode_gives_the_same_imports_as_the_source():
    assert bytecode_imports(_pyc(MODULE)) == EXPECTED


def test_a_real_module_of_the_standard_library_reads_in_full():
    import json

    with open(importlib.util.cache_from_source(json.__file__), "rb") as f:
        found = bytecode_imports(f.read())
    assert Import(1, "decoder", ("JSONDecoder", "JSONDecodeError")) in found
    assert Import(1, "encoder", ("JSONEncoder",)) in found


def test_bytecode_of_another_interpreter_version_or_cut_short_gives_nothing():
    pyc = _pyc(MODULE)
    assert bytecode_imports(b"\x00\x00" + pyc[2:]) == []  # an unknown magic number
    assert bytecode_imports(pyc[:len(pyc) // 2]) == []
    assert bytecode_imports(b"") == []


def test_a_huge_count_in_the_stream_is_refused_before_anything_is_allocated():
    head = importlib.util.MAGIC_NUMBER + bytes(12)
    assert bytecode_imports(head + b"(\xff\xff\xff\x7f") == []  # a tuple of 2**31 - 1 items, 0 bytes
    assert bytecode_imports(head + b"r\x05\x00\x00\x00") == []  # a reference to nothing


def test_deep_nesting_stops_the_walk_not_the_process():
    head = importlib.util.MAGIC_NUMBER + bytes(12)
    assert bytecode_imports(head + b")\x01" * 100_000 + b"N") == []


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_any_bytes_after_a_valid_header_never_raise(tail: bytes):
    assert isinstance(bytecode_imports(importlib.util.MAGIC_NUMBER + bytes(12) + tail), list)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_any_source_bytes_never_raise(src: bytes):
    for imp in source_imports(src):
        assert "/" not in imp.module and all("/" not in n and "." not in n for n in imp.names)
