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


#: Library search dirs of a Debian/Ubuntu-style image when no DT_RUNPATH says otherwise.
LIBRARY_DIRS = (b"/lib/x86_64-linux-gnu", b"/usr/lib/x86_64-linux-gnu", b"/lib64", b"/usr/lib64", b"/lib",
                b"/usr/lib")
MAX_NEEDED = 64
_MAX_DYNAMIC = 64 << 10
_MAX_STRTAB = 1 << 20


def needed_libraries(pread) -> list[bytes]:
    """The DT_NEEDED names of a 64-bit little-endian ELF file, read through `pread(n, off)`
    (hostile input: every offset and size is bounded; names with '/' are skipped).  What the
    dynamic loader will open right after the execve: worth fetching before it asks."""
    head = pread(64, 0)
    if head[:4] != b"\x7fELF" or len(head) < 64 or head[4] != 2 or head[5] != 1:
        return []
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    if phentsize < 56 or phnum > 512 or phoff > 1 << 20:
        return []
    ph = pread(phentsize * phnum, phoff)
    if len(ph) < phentsize * phnum:
        return []
    loads: list[tuple[int, int, int]] = []
    dynamic = None
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", ph, i * phentsize)
        p_offset, p_vaddr = struct.unpack_from("<QQ", ph, i * phentsize + 8)
        p_filesz, = struct.unpack_from("<Q", ph, i * phentsize + 32)
        if p_type == 1:  # PT_LOAD
            loads.append((p_vaddr, p_filesz, p_offset))
        elif p_type == 2 and 0 < p_filesz <= _MAX_DYNAMIC:  # PT_DYNAMIC
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []
    dyn = pread(dynamic[1], dynamic[0])
    needed: list[int] = []
    strtab = strsz = None
    for off in range(0, len(dyn) - 15, 16):
        tag, val = struct.unpack_from("<qQ", dyn, off)
        if tag == 0:  # DT_NULL
            break
        if tag == 1 and len(needed) < MAX_NEEDED:
            needed.append(val)
        elif tag == 5:
            strtab = val
        elif tag == 10:
            strsz = val
    if strtab is None or not strsz or strsz > _MAX_STRTAB:
        return []
    file_off = next((strtab - va + fo for va, sz, fo in loads if va <= strtab < va + sz), None)
    if file_off is None:
        return []
    table = pread(strsz, file_off)
    out = []
    for at in needed:
        if at >= len(table):
            continue
        name = table[at:table.find(b"\0", at) if b"\0" in table[at:] else len(table)]
        if name and b"/" not in name and len(name) <= 255:
            out.append(name)
    return out
