"""HMP argument parsing with QEMU's ``monitor_parse_arguments`` rules and messages.

``args_type`` is QEMU's mini-language: ``key:T`` entries separated by commas, where T is
``s`` (word or "quoted string"), ``F`` (filename), ``S`` (rest of line), ``i`` (32-bit
expression), ``l`` (64-bit expression), ``/`` (memory-dump format), ``b`` (on|off),
``-x`` (flag); a trailing ``?`` makes it optional. Errors are printed by the caller
followed by QEMU's ``Try "help CMD" for more information``.
"""

from __future__ import annotations

from sevmon.hmp.errors import HmpError
from sevmon.hmp.expr import parse_expr
from sevmon.hmp.memory_dump import FmtDefaults, parse_fmt_at


def _entries(args_type: str) -> list[tuple[str, str]]:
    out = []
    for item in filter(None, args_type.split(",")):
        key, _, typ = item.partition(":")
        out.append((key, typ))
    return out


def _skip_space(s: str, p: int) -> int:
    while p < len(s) and s[p].isspace():
        p += 1
    return p


def get_str(s: str, p: int) -> tuple[str | None, int]:
    """QEMU's get_str: a word, or a double-quoted string with \\n \\r \\\\ \\' \\" escapes."""
    p = _skip_space(s, p)
    if p >= len(s):
        return None, p
    if s[p] == '"':
        p += 1
        out = []
        while p < len(s) and s[p] != '"':
            if s[p] == "\\":
                p += 1
                c = s[p] if p < len(s) else ""
                p += 1
                if c == "n":
                    c = "\n"
                elif c == "r":
                    c = "\r"
                elif c not in ("\\", "'", '"'):
                    return None, p
                out.append(c)
            else:
                out.append(s[p])
                p += 1
        if p >= len(s):
            return None, p
        return "".join(out), p + 1
    start = p
    while p < len(s) and not s[p].isspace():
        p += 1
    return s[start:p], p


__all__ = ["FmtDefaults", "get_str", "parse_arguments"]


def parse_arguments(cmd_name: str, args_type: str, s: str, p: int, fmt: FmtDefaults, get_reg) -> dict:
    """Parse ``s[p:]`` per ``args_type``; return the argument dict or raise HmpError."""
    args: dict = {}
    for key, typ in _entries(args_type):
        c, rest = typ[0], typ[1:]
        optional = rest.startswith("?")
        if c in "sF":
            p = _skip_space(s, p)
            if optional and p >= len(s):
                continue
            val, p = get_str(s, p)
            if val is None:
                raise HmpError(f"{cmd_name}: {'filename' if c == 'F' else 'string'} expected")
            args[key] = val
        elif c == "S":
            p = _skip_space(s, p)
            if optional and p >= len(s):
                continue
            if p >= len(s):
                raise HmpError(f"{cmd_name}: string expected")
            args[key] = s[p:]
            p = len(s)
        elif c == "/":
            count, form, size, p = parse_fmt_at(s, p, fmt)
            args.update(count=count, format=form, size=size)
        elif c in "il":
            p = _skip_space(s, p)
            if optional and p >= len(s):
                continue
            val, p = parse_expr(s, p, get_reg)
            if c == "i" and (val >> 32) & 0xFFFFFFFF:
                raise HmpError(f"'{cmd_name}' has failed: integer is for 32-bit values")
            args[key] = val
        elif c == "b":
            p = _skip_space(s, p)
            start = p
            while p < len(s) and s[p].isprintable() and not s[p].isspace():
                p += 1
            word = s[start:p]
            if word not in ("on", "off"):
                raise HmpError("Expected 'on' or 'off'")
            args[key] = word == "on"
        elif c == "-":
            flag = rest[0]
            q = _skip_space(s, p)
            if q < len(s) and s[q] == "-":
                if q + 1 < len(s) and s[q + 1] == flag:
                    args[key] = True
                    p = q + 2
                else:
                    other = s[q + 1] if q + 1 < len(s) else ""
                    if not _is_later_option(other, args_type, key):
                        raise HmpError(f"{cmd_name}: unsupported option -{other}")
        else:
            raise HmpError(f"{cmd_name}: unknown type '{c}'")
    p = _skip_space(s, p)
    if p < len(s):
        raise HmpError(f"{cmd_name}: extraneous characters at the end of line")
    return args


def _is_later_option(flag: str, args_type: str, after_key: str) -> bool:
    """QEMU's is_valid_option: is ``-flag`` one of the options declared after this one?"""
    seen = False
    for key, typ in _entries(args_type):
        if seen and typ.startswith("-") and typ[1:2] == flag:
            return True
        if key == after_key:
            seen = True
    return False
