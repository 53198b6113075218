"""Which modules a Python module imports at its top level, read from its bytes.

A Python start-up misses one module after another: the interpreter opens a module, runs it,
and only then asks for what it imports (traced on pysci: ~150 misses in a row, 40-80 ms
apart).  The import statements say what comes next, so the supervisor can fill those
modules as soon as the importer has arrived.  Pure: source or bytecode bytes in, import
statements out.  Every byte is hostile: sizes, counts and depth are bounded before use, and
anything unexpected ends the scan with what was found so far (a hint, never a fact: a wrong
guess costs one fetch, every byte served is still verified against the image).
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

#: Bytes of a module looked at, at most (numpy's and pandas' biggest modules are ~1 MiB of pyc).
MAX_SCAN = 4 << 20
#: Import statements kept per module (a bound, not a tuning).
MAX_IMPORTS = 512
#: Marshal nesting and object count bounds of a .pyc walk (CPython's own depth limit is 2000).
MAX_DEPTH = 200
MAX_OBJECTS = 1 << 20

#: CPython versions whose code objects this walker reads: magic numbers (first two bytes of
#: a .pyc, little-endian) of 3.8 to 3.12, and the code object's leading int fields in each.
_CODE_INTS = ((3400, 3450, 6), (3450, 3550, 5))
_LOAD_CONST, _IMPORT_NAME, _EXTENDED_ARG = 100, 108, 144  # unchanged from 3.8 to 3.12
_LOAD_NAMES = (101, 106, 116)  # LOAD_NAME, LOAD_ATTR, LOAD_GLOBAL
_JUMP_IF_FALSE = 114  # POP_JUMP_IF_FALSE (3.8-3.10: absolute; POP_JUMP_FORWARD_IF_FALSE 3.11, 3.12: relative)
_FLAG_REF = 0x80
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*\Z")


class Import(NamedTuple):
    """`from <level dots><module> import <names>`; `import <module>` has level 0 and no names."""

    level: int
    module: str
    names: tuple[str, ...]


# ---- source --------------------------------------------------------------------------
_STATEMENT = re.compile(rb"[ \t]*(?:(?:async[ \t]+)?def|class|from|import)\b")


def source_imports(src: bytes) -> list[Import]:
    """The import statements of a module's source outside function and class bodies and
    `if TYPE_CHECKING:` blocks: what runs when the module is imported (those under other
    `if`s and `try` at the top level included).
    A line scanner, not a parser: docstrings that look like code can mislead it, at the
    cost of a guess."""
    out: list[Import] = []
    body = -1  # indentation of the def/class whose body we are in, -1: at the top level
    lines = src[:MAX_SCAN].split(b"\n")
    i = 0
    while i < len(lines) and len(out) < MAX_IMPORTS:
        line = lines[i]
        i += 1
        stripped = line.lstrip(b" \t")
        if not stripped or stripped[:1] == b"#":
            continue
        indent = len(line) - len(stripped)
        if body >= 0:
            if indent > body:
                continue
            body = -1
        if stripped.startswith(b"if ") and b"TYPE_CHECKING" in stripped and stripped.rstrip().endswith(b":"):
            body = indent  # never run: names only a type checker follows
            continue
        if not _STATEMENT.match(line):
            continue
        word = stripped.split(None, 1)[0].rstrip(b":(")
        if word in (b"def", b"class", b"async"):
            body = indent
            continue
        text = stripped.decode("ascii", "replace")
        while text.count("(") > text.count(")") and i < len(lines) and len(text) < 8192:
            text += " " + lines[i].decode("ascii", "replace")  # `from x import (a,\n b)`
            i += 1
        while text.endswith("\\") and i < len(lines) and len(text) < 8192:
            text = text[:-1] + " " + lines[i].decode("ascii", "replace")
            i += 1
        out.extend(_statement(text.split("#", 1)[0].split(";", 1)[0]))
    return out[:MAX_IMPORTS]


def _statement(text: str) -> list[Import]:
    words = text.split(None, 1)
    if len(words) < 2:
        return []
    if words[0] == "import":
        mods = [part.split()[0] for part in words[1].split(",") if part.split()]
        return [Import(0, m, ()) for m in mods if _IDENT.match(m)]
    head, sep, tail = words[1].partition(" import ")
    if not sep:
        return []
    head = head.strip()
    level = len(head) - len(head.lstrip("."))
    module = head[level:]
    if module and not _IDENT.match(module):
        return []
    names = tuple(n.split()[0] for n in tail.strip().strip("()").split(",")
                  if n.split() and _IDENT.match(n.split()[0]))
    return [Import(level, module, names)]


# ---- bytecode ------------------------------------------------------------------------
class _Bad(Exception):
    """The bytes are not a marshal stream this walker reads: stop, keep what was found."""


def bytecode_imports(pyc: bytes) -> list[Import]:
    """The IMPORT_NAME instructions of a .pyc's module-level code with their level and
    from-list (the two LOAD_CONSTs before each), for CPython 3.8 to 3.12; [] for any other
    version or anything that does not parse.  Nested code (functions, classes) is walked
    over, never looked into: its imports run later, if ever."""
    if len(pyc) < 17 or pyc[2:4] != b"\r\n":
        return []
    magic = pyc[0] | pyc[1] << 8
    ints = next((n for lo, hi, n in _CODE_INTS if lo <= magic < hi), None)
    if ints is None:
        return []
    walker = _Marshal(pyc[:MAX_SCAN], 16, ints)
    try:
        top = walker.value(0)
    except (_Bad, struct.error, IndexError, RecursionError):
        return []
    if not isinstance(top, _Code):
        return []
    return _imports_of(top, magic)


class _Code(NamedTuple):
    code: bytes
    consts: tuple
    names: tuple


class _Marshal:
    """A bounded reader of CPython's marshal format (Python/marshal.c), just enough for code
    objects: every length is checked against what is left before anything is allocated."""

    def __init__(self, data: bytes, pos: int, code_ints: int) -> None:
        self.data = data
        self.pos = pos
        self.code_ints = code_ints
        self.refs: list = []
        self.count = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _Bad
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def _long(self) -> int:
        (v,) = struct.unpack_from("<i", self.data, self.pos)
        self.pos += 4
        return v

    def _count(self, least_bytes_each: int = 1) -> int:
        n = self._long()
        if n < 0 or n * least_bytes_each > len(self.data) - self.pos:
            raise _Bad
        return n

    def value(self, depth: int):
        if depth > MAX_DEPTH:
            raise _Bad
        self.count += 1
        if self.count > MAX_OBJECTS or self.pos >= len(self.data):
            raise _Bad
        t = self.data[self.pos]
        self.pos += 1
        flag, t = t & _FLAG_REF, chr(t & ~_FLAG_REF)
        if t in "()[<>{c":  # containers reserve their ref slot before their items
            slot = len(self.refs)
            if flag:
                self.refs.append(None)
            v = self._container(t, depth)
            if flag:
                self.refs[slot] = v
            return v
        if t == "r":
            n = self._long()
            if not 0 <= n < len(self.refs):
                raise _Bad
            return self.refs[n]
        v = self._simple(t)
        if flag:
            self.refs.append(v)
        return v

    def _simple(self, t: str):
        if t in "NTFS.0":
            return {"N": None, "T": True, "F": False}.get(t)
        if t == "i":
            return self._long()
        if t in "zZ":
            n = self._take(1)[0]
            return self._take(n).decode("latin-1")
        if t in "aAut":
            return self._take(self._count()).decode("latin-1")
        if t == "s":
            return self._take(self._count())
        if t == "g":
            self._take(8)
            return 0.0
        if t == "y":
            self._take(16)
            return 0j
        if t == "l":
            n = self._long()
            if abs(n) > 1 << 20:
                raise _Bad
            self._take(2 * abs(n))
            return 0
        if t in "fx":  # text floats (marshal version 0/1): never in a .pyc, read past anyway
            for _ in range(2 if t == "x" else 1):
                self._take(self._take(1)[0])
            return 0.0
        raise _Bad

    def _container(self, t: str, depth: int):
        if t == "c":
            self._take(4 * self.code_ints)
            code = self.value(depth + 1)
            consts = self.value(depth + 1)
            names = self.value(depth + 1)
            for _ in range(5):  # up to firstlineno: varnames..name (3.8-3.10), localsplusnames..qualname
                self.value(depth + 1)
            self._take(4)  # firstlineno
            self.value(depth + 1)  # linetable / lnotab
            if self.code_ints == 5:
                self.value(depth + 1)  # exceptiontable (3.11+)
            if not isinstance(code, bytes) or not isinstance(consts, tuple) or not isinstance(names, tuple):
                raise _Bad
            return _Code(code, consts, names)
        if t == "{":
            while True:
                if self.pos < len(self.data) and self.data[self.pos] == ord("0"):
                    self.pos += 1
                    return {}
                self.value(depth + 1)
                self.value(depth + 1)
        n = self._take(1)[0] if t == ")" else self._count()
        items = tuple(self.value(depth + 1) for _ in range(n))
        return items


def _imports_of(code: _Code, magic: int) -> list[Import]:
    """Module-level imports, less those under `if TYPE_CHECKING:` (never run; pandas has
    many, naming most of scipy)."""
    out: list[Import] = []
    consts, names = code.consts, code.names
    recent: list[int] = []  # args of the LOAD_CONSTs just before, most recent last
    ext = 0
    raw = code.code
    checking = False  # the last name loaded was TYPE_CHECKING
    skip_to = 0  # the end of an `if TYPE_CHECKING:` block
    for at in range(0, len(raw) - 1, 2):
        op, arg = raw[at], raw[at + 1] | ext
        if op == _EXTENDED_ARG:
            ext = arg << 8
            continue
        ext = 0
        if op in _LOAD_NAMES:
            index = arg >> 1 if op == 116 and magic >= 3450 else arg  # 3.11's LOAD_GLOBAL: name << 1
            checking = index < len(names) and names[index] == "TYPE_CHECKING"
            recent = []
            continue
        if op == _JUMP_IF_FALSE and checking:
            skip_to = max(skip_to, arg if magic < 3430 else 2 * arg if magic < 3450 else at + 2 + 2 * arg)
        if op:
            checking = False
        if at < skip_to:
            recent = []
            continue
        if op == _LOAD_CONST:
            recent = [*recent[-1:], arg]
        elif op == _IMPORT_NAME:
            if len(recent) == 2 and arg < len(names) and all(a < len(consts) for a in recent):
                level, fromlist, module = consts[recent[0]], consts[recent[1]], names[arg]
                if isinstance(level, int) and 0 <= level < 64 and isinstance(module, str) \
                        and (not module or _IDENT.match(module)):
                    listed = fromlist if isinstance(fromlist, tuple) else ()
                    out.append(Import(level, module, tuple(n for n in listed
                                                           if isinstance(n, str) and _IDENT.match(n))))
                    if len(out) >= MAX_IMPORTS:
                        break
            recent = []
        elif op:  # CACHE entries (opcode 0) sit between an instruction and the next
            recent = []
    return out
