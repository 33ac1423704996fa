"""QEMU's HMP expression parser (``get_expr`` in monitor/hmp.c) for numeric arguments.

Grammar and behaviour, as in QEMU 7.2 (facts re-derived, not copied)::

    sum   := logic  (('+' | '-') logic)*
    logic := prod   (('&' | '|' | '^') prod)*      # NB: binds *tighter* than + and -
    prod  := unary  (('*' | '/' | '%') unary)*
    unary := '+' unary | '-' unary | '~' unary | '(' sum ')'
           | "'" CHAR "'" | '$' REGNAME | NUMBER

* Arithmetic is on a signed 64-bit integer and wraps (QEMU builds with ``-fwrapv``);
  ``/`` and ``%`` truncate toward zero like C.
* ``NUMBER`` is ``strtoull(..., 0)``: ``0x``/``0X`` hex, a leading ``0`` octal, else
  decimal; larger than 2**64-1 is "number too large". The result is reinterpreted as
  signed 64-bit.
* Whitespace is skipped after every token; leading whitespace is skipped too. Parsing
  stops at the first character that cannot continue the expression; the caller decides
  whether anything after ``new_pos`` is an error.
* ``$name`` reads a register through ``get_reg(name) -> int | None`` (None: "unknown
  register"). Names are ``[A-Za-z0-9_.]*``, at most 127 characters are kept.
  :func:`monitor_reg_lookup` gives QEMU's x86 table for a :class:`CpuState`.

Error texts are QEMU's exactly (without the newline): ``unexpected end of expression``,
``')' expected``, ``character constant expected``, ``missing terminating ' character``,
``unknown register``, ``number too large``, ``invalid char 'X' in expression``,
``division by zero``; and for ``i`` arguments ``'CMD' has failed: integer is for 32-bit
values`` (:func:`check_int_arg`).
"""

from __future__ import annotations

from collections.abc import Callable

from sevmon.hmp.errors import HmpError

_U64 = (1 << 64) - 1
_SPACE = " \t\n\v\f\r"
_REGCHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.")

GetReg = Callable[[str], "int | None"]


def _s64(v: int) -> int:
    v &= _U64
    return v - (1 << 64) if v >> 63 else v


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >> 31 else v


class _Parser:
    def __init__(self, text: str, pos: int, get_reg: GetReg):
        # A NUL ends the C string: nothing after it is seen.
        nul = text.find("\0", pos)
        self.text = text if nul < 0 else text[:nul]
        self.pos = pos
        self.get_reg = get_reg

    # -- lexing ---------------------------------------------------------------------
    def cur(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _SPACE:
            self.pos += 1

    def next(self) -> None:
        """QEMU's ``next()``: step over one character, then over whitespace."""
        if self.pos < len(self.text):
            self.pos += 1
            self.skip_space()

    # -- grammar --------------------------------------------------------------------
    def sum(self) -> int:
        val = self.logic()
        while (op := self.cur()) in ("+", "-"):
            self.next()
            val2 = self.logic()
            val = _s64(val + val2 if op == "+" else val - val2)
        return val

    def logic(self) -> int:
        val = self.prod()
        while (op := self.cur()) in ("&", "|", "^"):
            self.next()
            val2 = self.prod()
            if op == "&":
                val &= val2
            elif op == "|":
                val |= val2
            else:
                val ^= val2
            val = _s64(val)
        return val

    def prod(self) -> int:
        val = self.unary()
        while (op := self.cur()) in ("*", "/", "%"):
            self.next()
            val2 = self.unary()
            if op == "*":
                val = _s64(val * val2)
                continue
            if val2 == 0:
                raise HmpError("division by zero")
            q = abs(val) // abs(val2)
            if (val < 0) != (val2 < 0):
                q = -q
            val = _s64(q) if op == "/" else _s64(val - q * val2)
        return val

    def unary(self) -> int:
        c = self.cur()
        if c == "+":
            self.next()
            return self.unary()
        if c == "-":
            self.next()
            return _s64(-self.unary())
        if c == "~":
            self.next()
            return _s64(~self.unary())
        if c == "(":
            self.next()
            n = self.sum()
            if self.cur() != ")":
                raise HmpError("')' expected")
            self.next()
            return n
        if c == "'":
            self.pos += 1
            ch = self.cur()
            if ch == "":
                raise HmpError("character constant expected")
            if ord(ch) > 0x7F:
                # QEMU reads one byte of the UTF-8 sequence; the next byte is not "'".
                raise HmpError("missing terminating ' character")
            self.pos += 1
            if self.cur() != "'":
                raise HmpError("missing terminating ' character")
            self.next()
            return ord(ch)
        if c == "$":
            self.pos += 1
            start = self.pos
            while self.pos < len(self.text) and self.text[self.pos] in _REGCHARS:
                self.pos += 1
            name = self.text[start:self.pos][:127]
            self.skip_space()
            value = self.get_reg(name)
            if value is None:
                raise HmpError("unknown register")
            return _s64(value)
        if c == "":
            raise HmpError("unexpected end of expression")
        return self.number()

    def number(self) -> int:
        """``strtoull(pch, &p, 0)`` at a non-space, non-sign character."""
        t, p = self.text, self.pos
        n = len(t)
        hexdigits = "0123456789abcdefABCDEF"
        if t.startswith(("0x", "0X"), p) and p + 2 < n and t[p + 2] in hexdigits:
            q = p + 2
            while q < n and t[q] in hexdigits:
                q += 1
            value = int(t[p + 2:q], 16)
        elif t.startswith("0", p):
            q = p + 1
            while q < n and t[q] in "01234567":
                q += 1
            value = int(t[p:q], 8)
        else:
            q = p
            while q < n and t[q] in "0123456789":
                q += 1
            if q == p:
                raise HmpError(f"invalid char '{t[p]}' in expression")
            value = int(t[p:q])
        if value > _U64:
            raise HmpError("number too large")
        self.pos = q
        self.skip_space()
        return _s64(value)


def parse_expr(text: str, pos: int, get_reg: GetReg) -> tuple[int, int]:
    """Parse one expression of ``text`` starting at ``pos`` (leading blanks allowed).

    Returns ``(value, new_pos)``: ``value`` is QEMU's signed 64-bit result (callers that
    want an address mask it with ``2**64-1``), ``new_pos`` the index of the first
    character not consumed (trailing blanks are consumed). Raises :class:`HmpError`.
    """
    p = _Parser(text, pos, get_reg)
    p.skip_space()
    value = p.sum()
    return value, p.pos


def check_int_arg(value: int, cmd_name: str) -> int:
    """QEMU's check for ``i`` (32-bit) arguments: bits 32..63 must be zero.

    Note that QEMU tests ``(val >> 32) & 0xffffffff`` on the signed value, so a negative
    number fails too.
    """
    if (value >> 32) & 0xFFFFFFFF:
        raise HmpError(f"'{cmd_name}' has failed: integer is for 32-bit values")
    return value


def monitor_reg_lookup(cpu) -> GetReg:
    """QEMU 7.2's x86_64 ``monitor_defs`` over a :class:`~sevmon.x86.cpu.CpuState`.

    Names (exact, case-sensitive, as ``hmp_compare_cmd``): ``eax ecx edx ebx``,
    ``esp|sp``, ``ebp|fp``, ``esi edi``, ``r8``..``r15``, ``eflags``, ``eip``; per segment
    ``cs ds es ss fs gs`` (selector), ``<seg>.base``, ``<seg>.limit``; and ``pc`` (=
    ``eip + cs.base``). There is no ``$rax``/``$rip``/``$cr3`` in QEMU: those are
    "unknown register". ``eax`` etc. read the whole 64-bit register (target_long);
    selector and limit are read as int32, so a limit of 0xffffffff reads as -1.
    With ``cpu`` None every name is unknown (QEMU: no CPU).
    """
    if cpu is None:
        return lambda name: None

    tlong = {
        "eax": "rax", "ecx": "rcx", "edx": "rdx", "ebx": "rbx",
        "esp": "rsp", "sp": "rsp", "ebp": "rbp", "fp": "rbp",
        "esi": "rsi", "edi": "rdi", "eflags": "rflags", "eip": "rip",
        **{f"r{i}": f"r{i}" for i in range(8, 16)},
    }
    segs = ("cs", "ds", "es", "ss", "fs", "gs")

    def get_reg(name: str) -> int | None:
        if name in tlong:
            return _s64(cpu.get(tlong[name]))
        if name in segs:
            return _s32(cpu.get(name))
        seg, dot, field = name.partition(".")
        if dot and seg in segs:
            if field == "base":
                return _s64(cpu.get(f"{seg}_base"))
            if field == "limit":
                return _s32(cpu.get(f"{seg}_limit"))
            return None
        if name == "pc":
            return _s64(cpu.get("rip") + cpu.get("cs_base"))
        return None

    return get_reg
