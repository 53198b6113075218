"""A TOC document read one entry at a time, from decompressed pieces.

`json.loads` of a whole TOC holds the JSON text twice (bytes and str) and one dict per
entry at once: a TOC at the 256 MiB size limit took 542 MB, and one of 500k entries 706 MB,
before anything refused it.  Here the text arrives in pieces of at most a MiB, each entry
is decoded alone (by the json module's own C scanner) and handed on, and only the unread
tail of the text is kept, so memory stays at a few MiB beyond what the caller keeps of the
entries (`build_toc` keeps columns).  Pure: bytes in, dicts out.

Accepted: exactly what `json.loads` accepts for a TOC object, with the entries list under
the key "entries" (once) and `"version": 1` anywhere in the object.  One value (an entry,
or any other member of the document) may be at most MAX_VALUE of text.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator

from .toc import FormatError

#: The largest single entry: 64 xattrs of 64 KiB in base64 and two 4096-character names fit.
MAX_VALUE = 8 << 20
#: Pieces of this size are cut from a caller's whole buffer.
PIECE = 1 << 20
_WS = re.compile(r"[ \t\n\r]*")
_SCAN = json.JSONDecoder().scan_once


def pieces_of(data: bytes | memoryview, size: int = PIECE) -> Iterator[memoryview]:
    """A whole buffer as pieces (no copies)."""
    mv = memoryview(data)
    for i in range(0, len(mv), size):
        yield mv[i:i + size]


class _Text:
    """The decoded text seen so far, minus what has been read."""

    def __init__(self, pieces: Iterable[bytes | memoryview], what: str) -> None:
        self._pieces = iter(pieces)
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.what = what
        self.buf = ""
        self.pos = 0
        self.eof = False

    def more(self) -> bool:
        """Append the next piece's text; False at the end of the input."""
        if self.eof:
            return False
        if self.pos > PIECE:
            self.buf, self.pos = self.buf[self.pos:], 0
        try:
            for piece in self._pieces:
                text = self._decoder.decode(piece)
                if text:
                    self.buf += text
                    return True
            self.eof = True
            text = self._decoder.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise FormatError(f"{self.what} is not UTF-8 JSON: {str(e)[:80]}") from None
        self.buf += text
        return bool(text)

    def peek(self) -> str:
        """The next character that is not white space ("" at the end)."""
        while True:
            self.pos = _WS.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def expect(self, chars: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            raise self.error(f"expected {' or '.join(chars)}")
        self.pos += 1
        return c

    def value(self) -> object:
        """The next JSON value, read to its end (more text is appended until it parses)."""
        self.peek()
        while True:
            try:
                obj, end = _SCAN(self.buf, self.pos)
            except StopIteration:
                obj, end = None, -1
            except json.JSONDecodeError:
                obj, end = None, -1
            except RecursionError:
                raise self.error("nested too deeply") from None
            # A value that ends with the text may go on in the next piece (a number, say).
            if end >= 0 and (end < len(self.buf) or self.eof):
                self.pos = end
                return obj
            if len(self.buf) - self.pos > MAX_VALUE:
                raise FormatError(f"{self.what} has a value larger than {MAX_VALUE} bytes")
            if not self.more():
                if end >= 0:
                    self.pos = end
                    return obj
                raise self.error("invalid or truncated value")

    def error(self, why: str) -> FormatError:
        return FormatError(f"{self.what} is not JSON: {why} at {self.buf[self.pos:self.pos + 20]!r}")


def toc_entries(pieces: Iterable[bytes | memoryview], what: str = "TOC") -> Iterator[object]:
    """Yield the raw entries of a TOC document (version 1) as they are read; FormatError
    for anything that is not one, raised when it is met (the version once all is read)."""
    t = _Text(pieces, what)
    t.expect("{")
    version: object = None
    seen_entries = False
    if t.peek() == "}":
        t.pos += 1
    else:
        while True:
            key = t.value()
            if not isinstance(key, str):
                raise t.error("expected a member name")
            t.expect(":")
            if key == "entries":
                if seen_entries:
                    raise FormatError(f"{what} has two entries lists")
                seen_entries = True
                if t.peek() != "[":
                    raise FormatError(f"{what} has no entries list")
                t.pos += 1
                if t.peek() == "]":
                    t.pos += 1
                else:
                    while True:
                        yield t.value()
                        if t.expect(",]") == "]":
                            break
            else:
                v = t.value()
                if key == "version":
                    version = v
            if t.expect(",}") == "}":
                break
    if t.peek():
        raise t.error("extra data after the document")
    if type(version) is not int or version != 1:
        raise FormatError(f"unsupported {what} version {str(version)[:20]!r}")
    if not seen_entries:
        raise FormatError(f"{what} has no entries list")
