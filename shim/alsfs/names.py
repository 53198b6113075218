"""The names containers/storage looks up in an additional layer store, parsed and checked.

    /                                   the store
    /<base64(image ref)>                one image reference (`:ref` in storage.conf)
    /<base64(image ref)>/<digest>       one layer of it, by compressed digest
    /.../<digest>/{diff,info,blob,use}  what podman stats, reads, opens and creates

Every name comes from whoever can reach the mount point: anything that is not strict
standard base64 of a reference we can parse, or not a well-formed digest, is no name at all
(the file system answers ENOENT).  Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from ..registry.reference import InvalidReference, parse_reference

LAYER_FILES = ("diff", "info", "blob")
USE_FILE = "use"
MAX_NAME = 255
_HEX = frozenset("0123456789abcdef")
_DIGEST_LEN = {"sha256": 64, "sha512": 128}


@dataclass(frozen=True)
class Name:
    """A parsed path: `ref` ('' for the root), `digest` ('' above a layer), `file` ('' above
    a layer's files)."""

    ref: str = ""
    digest: str = ""
    file: str = ""


def decode_ref(element: str) -> str | None:
    """The image reference a path element names, or None."""
    if not element or len(element) > MAX_NAME:
        return None
    try:
        raw = base64.b64decode(element.encode("ascii"), validate=True)
        ref = raw.decode("utf-8")
    except (UnicodeError, binascii.Error, ValueError):
        return None
    if base64.standard_b64encode(raw).decode() != element:  # one spelling per name
        return None
    try:
        parse_reference(ref)
    except (InvalidReference, ValueError):
        return None
    return ref


def is_digest(element: str) -> bool:
    alg, sep, hexpart = element.partition(":")
    return bool(sep) and _DIGEST_LEN.get(alg) == len(hexpart) and set(hexpart) <= _HEX


def parse(path: str) -> Name | None:
    """The name at `path` (as FUSE passes it: absolute, no `.`/`..`), or None if there is
    none."""
    if not path.startswith("/"):
        return None
    parts = [p for p in path.split("/") if p]
    if not parts:
        return Name()
    if len(parts) > 3 or any(p in (".", "..") for p in parts):
        return None
    ref = decode_ref(parts[0])
    if ref is None:
        return None
    if len(parts) == 1:
        return Name(ref)
    if not is_digest(parts[1]):
        return None
    if len(parts) == 2:
        return Name(ref, parts[1])
    if parts[2] not in LAYER_FILES and parts[2] != USE_FILE:
        return None
    return Name(ref, parts[1], parts[2])
