"""QEMU's ``x`` / ``xp`` output (``memory_dump`` in monitor/misc.c, QEMU 7.2) and its
``/fmt`` argument (``monitor_parse_arguments``, case ``'/'``, in monitor/hmp.c).

Facts reproduced (re-derived from QEMU, not copied):

* ``/fmt`` is ``/{count}{format}{size}``: a decimal count (default 1, accumulated as a
  wrapping C ``int``), then any mix of format letters ``o d u x i c`` and size letters
  ``b h w g`` (``L`` = ``g``); the last of each kind wins. Anything else before the next
  blank is ``invalid char in format: 'z'``. A missing format or size comes from the
  *sticky* defaults (initially ``x`` and 4), and every use updates them; for ``i`` an
  omitted size stays -1 and the sticky size is left alone. No ``/fmt`` at all: count 1,
  the sticky format and size.
* ``len = size * count``; 8 bytes a line for size 1, else 16. Field widths: ``o``
  ``ceil(bits/3)`` with ``%#o``; ``x`` ``bits/4`` zero-padded after ``0x``; ``u``/``d``
  ``ceil(bits*10/33)`` right-aligned (``d`` prints the zero-extended value as a signed
  64-bit number, so only size ``g`` can be negative); ``c`` sets the element size to 1
  *after* ``len`` and the line size are computed, so ``x /4c`` with sticky size ``w``
  prints 16 characters in one line; characters print as ``'A'``, ``'\\n'``, ``'\\r'``,
  ``'\\\\'``, ``'\\''``, or ``'\\xNN'``.
* Each line starts with the address and a colon: ``x`` prints the address as the target's
  ``target_ulong`` (16 hex digits for qemu-system-x86_64, even for 32-bit guests; 8 with
  ``addr_width_bits=32``), ``xp`` always 16 digits. If the line's bytes cannot be read,
  the line is ``<addr>: Cannot access memory`` and the dump stops. Count 0 prints nothing.
* Format ``i`` (disassembly) is **not** implemented by sevmon: :func:`memory_dump` yields
  the single line ``format 'i' is not supported by sevmon``. (QEMU would disassemble.)

Lines are yielded with a trailing ``"\\n"`` as QEMU's ``monitor_printf`` writes them; the
monitor layer turns ``"\\n"`` into ``"\\r\\n"`` like QEMU's ``monitor_puts``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from sevmon.hmp.errors import HmpError
from sevmon.memory.ram import MemoryAccessError

_SPACE = " \t\n\v\f\r"
_U64 = (1 << 64) - 1
_PAGE = 4096

I_UNSUPPORTED = "format 'i' is not supported by sevmon"


@dataclass
class FmtDefaults:
    """QEMU's ``default_fmt_format`` / ``default_fmt_size`` (process-wide statics in QEMU;
    sevmon keeps one per monitor or per daemon, as the caller chooses)."""

    format: str = "x"
    size: int = 4


def _wrap_int(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >> 31 else v


def parse_fmt_at(text: str, pos: int, defaults: FmtDefaults) -> tuple[int, str, int, int]:
    """Parse an optional ``/fmt`` at ``text[pos:]`` (leading blanks skipped).

    Returns ``(count, format, size, new_pos)``; ``new_pos`` is just after the format
    (or at the first non-blank if there was no ``/``). Updates ``defaults`` like QEMU.
    """
    n = len(text)
    p = pos
    while p < n and text[p] in _SPACE:
        p += 1
    if p < n and text[p] == "/":
        p += 1
        count = 1
        if p < n and text[p].isascii() and text[p].isdigit():
            count = 0
            while p < n and text[p].isascii() and text[p].isdigit():
                count = _wrap_int(count * 10 + ord(text[p]) - 48)
                p += 1
        fmt: str | None = None
        size = -1
        sizes = {"b": 1, "h": 2, "w": 4, "g": 8, "L": 8}
        while p < n:
            c = text[p]
            if c in "oduxic":
                fmt = c
            elif c in sizes:
                size = sizes[c]
            else:
                break
            p += 1
        if p < n and text[p] not in _SPACE and text[p] != "\0":
            raise HmpError(f"invalid char in format: '{text[p]}'")
        if fmt is None:
            fmt = defaults.format
        if fmt != "i":
            if size < 0:
                size = defaults.size
            defaults.size = size
        defaults.format = fmt
        return count, fmt, size, p
    fmt = defaults.format
    return 1, fmt, (defaults.size if fmt != "i" else -1), p


def parse_fmt(text: str, defaults: FmtDefaults) -> tuple[int, str, int]:
    """``(count, format, size)`` for a ``/fmt`` token such as ``"/4xg"``.

    Text without a leading ``/`` (e.g. ``""``) means "no format": count 1 and the sticky
    defaults. Whatever follows the format after a blank is ignored (use
    :func:`parse_fmt_at` to get the position). Errors raise :class:`HmpError` with QEMU's
    text, e.g. ``invalid char in format: 'z'``.
    """
    count, fmt, size, _ = parse_fmt_at(text, 0, defaults)
    return count, fmt, size


def _printc(c: int) -> str:
    if c == 0x27:
        return "'\\''"
    if c == 0x5C:
        return "'\\\\'"
    if c == 0x0A:
        return "'\\n'"
    if c == 0x0D:
        return "'\\r'"
    if 32 <= c <= 126:
        return f"'{chr(c)}'"
    return f"'\\x{c:02x}'"


def _formatter(fmt: str, wsize: int) -> Callable[[int], str]:
    bits = wsize * 8
    if fmt == "o":
        width = -(-bits // 3)
        return lambda v: f"{'0' + format(v, 'o') if v else '0':>{width}}"
    if fmt in ("u", "d"):
        width = -(-(bits * 10) // 33)
        if fmt == "u":
            return lambda v: f"{v:>{width}}"
        return lambda v: f"{(v - (1 << 64) if v >> 63 else v):>{width}}"
    if fmt == "c":
        return _printc
    width = bits // 4  # 'x' (and QEMU's default case)
    return lambda v: f"0x{v:0{width}x}"


def memory_dump(
    read: Callable[[int, int], bytes],
    addr: int,
    count: int,
    fmt: str,
    size: int,
    *,
    virtual: bool,
    addr_width_bits: int = 64,
    span: int = _PAGE,
) -> Iterator[str]:
    """Yield QEMU's ``x`` (``virtual=True``) or ``xp`` output lines, each ending in ``"\\n"``.

    ``read(addr, n)`` returns ``n`` bytes at ``addr`` (guest-virtual for ``x``,
    guest-physical for ``xp``) or raises :class:`MemoryAccessError`. Reads are grouped:
    every whole line up to the next ``span`` boundary (a power of two, 4 KiB unless the caller reads
    larger ranges at once: ``x`` over physically contiguous pages is then one read) is fetched in one
    call; a group of more than a page that fails is retried page by page, and a page-sized group that
    fails has its lines re-read one by one, so the output stops at exactly the line QEMU stops at. ``addr_width_bits`` is the target's ``target_ulong`` width (64 for
    qemu-system-x86_64); for ``x`` the address is truncated to it, as QEMU does.
    """
    if fmt == "i":
        yield I_UNSUPPORTED + "\n"
        return
    if size not in (1, 2, 4, 8):
        raise ValueError(f"invalid size {size}")
    vmask = (1 << addr_width_bits) - 1 if virtual else _U64
    digits = addr_width_bits // 4 if virtual else 16
    addr &= vmask if virtual else _U64

    length = _wrap_int(size * count)
    line_size = 8 if size == 1 else 16
    wsize = 1 if fmt == "c" else size
    conv = _formatter(fmt, wsize)

    def render(a: int, data: bytes) -> str:
        vals = (int.from_bytes(data[i:i + wsize], "little") for i in range(0, len(data), wsize))
        return f"{a & vmask:0{digits}x}:" + "".join(" " + conv(v) for v in vals) + "\n"

    def grouped(addr: int, length: int, span: int) -> Iterator[list[tuple[int, int]]]:
        """The ``(address, n)`` lines, a list per group: those that fit before the next ``span`` boundary
        (at least one)."""
        while length > 0:
            lines: list[tuple[int, int]] = []
            a, left, group = addr, length, 0
            limit = span - (addr & (span - 1))
            while left > 0:
                n = min(left, line_size)
                if lines and group + n > limit:
                    break
                lines.append((a, n))
                group += n
                a = (a + n) & _U64
                left -= n
            yield lines
            addr, length = a, left

    def emit(lines: list[tuple[int, int]], span: int):
        """Yield the group's lines; return True when one cannot be read (the dump stops there)."""
        addr, group = lines[0][0], sum(n for _, n in lines)
        data: bytes | None = None
        if len(lines) > 1 and (addr & vmask) + group <= vmask:
            try:
                data = read(addr & vmask, group)
            except MemoryAccessError:
                data = None
            except Exception:  # e.g. debug refused part-way: page by page prints what comes before, as QEMU does
                if span <= _PAGE:
                    raise
                data = None
        if data is None and span > _PAGE and len(lines) > 1:
            for sub in grouped(addr, group, _PAGE):
                if (yield from emit(sub, _PAGE)):
                    return True
            return False
        off = 0
        for la, n in lines:
            if data is not None:
                chunk = data[off:off + n]
            else:
                try:
                    chunk = read(la & vmask, n)
                except MemoryAccessError:
                    yield f"{la & vmask:0{digits}x}: Cannot access memory\n"
                    return True
            off += n
            yield render(la, chunk)
        return False

    for lines in grouped(addr, length, span):
        if (yield from emit(lines, span)):
            return
