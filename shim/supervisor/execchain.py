"""What else the kernel opens, unasked, when it executes a file.

The ELF interpreter (PT_INTERP) and a `#!` script's interpreter are opened by the kernel
itself during execve, without a notification, so the supervisor must fill them before it
lets the execve proceed.  Pure: header bytes in, interpreter path out.
"""

from __future__ import annotations

import struct

HEADER_READ = 4096  # enough for the ELF header, program headers and interpreter path in practice
BINPRM_BUF_SIZE = 256  # the kernel reads a #! line from at most this many bytes
MAX_DEPTH = 5  # the kernel's own recursion limit for interpreters


def interpreter(head: bytes) -> tuple[bytes, int] | None:
    """(interpreter path, program header end) for ELF, or (path, 0) for #!; None otherwise.

    A second return value > len(head) means the ELF program headers lie further in the
    file and the caller should read that much and ask again.
    """
    if head.startswith(b"#!"):
        line = head[2:BINPRM_BUF_SIZE].split(b"\n", 1)[0].strip(b" \t")
        path = line.split(None, 1)[0] if line else b""
        return (path, 0) if path else None
    if head[:4] != b"\x7fELF" or len(head) < 64 or head[4] != 2 or head[5] != 1:
        return None  # only 64-bit little-endian ELF (x86_64)
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    if phentsize < 56 or phnum > 512:
        return None
    end = phoff + phentsize * phnum
    if end > len(head):
        return (b"", end) if end <= 1 << 20 else None
    for i in range(phnum):
        base = phoff + i * phentsize
        p_type, = struct.unpack_from("<I", head, base)
        if p_type == 3:  # PT_INTERP
            p_offset, = struct.unpack_from("<Q", head, base + 8)
            p_filesz, = struct.unpack_from("<Q", head, base + 32)
            if p_filesz == 0 or p_filesz > 4096:
                return None
            if p_offset + p_filesz > len(head):
                return (b"", p_offset + p_filesz) if p_offset + p_filesz <= 1 << 20 else None
            return head[p_offset:p_offset + p_filesz].rstrip(b"\0"), 0
    return None
