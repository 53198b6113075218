"""Decode one chunk's compressed bytes by layer format (pure)."""

from __future__ import annotations

from . import estargz
from .toc import FormatError


def decode_chunk(fmt: str, data: bytes, inner_offset: int, size: int) -> bytes:
    if fmt == "estargz":
        return estargz.decode_member(data, inner_offset, size)
    if fmt == "zstd:chunked":
        from . import zstdchunked

        return zstdchunked.decode_frame(data, inner_offset, size)
    raise FormatError(f"layer format {fmt!r} has no chunks")
