"""JSON output exactly like QEMU 7.2's ``qobject/json-writer.c`` (non-pretty).

* separators ``", "`` and ``": "``; ``{}`` / ``[]`` for empty containers;
* pure ASCII: ``\\" \\\\ \\b \\f \\n \\r \\t``, every other code point below
  0x20 or at/above 0x7F as ``\\uXXXX`` (uppercase hex), astral characters as
  a surrogate pair.  QEMU decodes its (modified UTF-8) C strings with
  mod_utf8_codepoint() and writes anything it rejects as ``\\uFFFD``; the
  Python equivalents are lone surrogates and Unicode's 66 noncharacters
  (U+FDD0..U+FDEF, U+xxFFFE, U+xxFFFF).  U+0000 is written ``\\u0000`` (QEMU
  stores a ``\\u0000`` it parsed as the modified-UTF-8 pair C0 80);
* integers in decimal, doubles with ``%.17g`` (so ``0.1`` is
  ``0.10000000000000001``, ``-0.0`` is ``-0``, infinities/NaN print as glibc
  does: ``inf``, ``-inf``, ``nan``, ``-nan``);
* dict members in the order given.

The caller appends the ``\\r\\n`` line terminator.
"""

from __future__ import annotations

import json
import math
import re

__all__ = ["to_qemu_json"]

_NEEDS_ESCAPE = re.compile(r"[^\x20\x21\x23-\x5b\x5d-\x7e]")

_SHORT = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
}


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    short = _SHORT.get(ch)
    if short is not None:
        return short
    cp = ord(ch)
    if 0xD800 <= cp <= 0xDFFF or 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        return "\\uFFFD"  # QEMU: invalid sequence -> replacement character
    if cp > 0xFFFF:
        cp -= 0x10000
        return f"\\u{0xD800 + (cp >> 10):04X}\\u{0xDC00 + (cp & 0x3FF):04X}"
    return f"\\u{cp:04X}"


def _quoted(s: str) -> str:
    if len(s) > 256:
        # json.dumps agrees with QEMU unless it wrote a \u escape (its hex is lowercase, QEMU's uppercase,
        # and QEMU replaces noncharacters) or s holds DEL (QEMU escapes it): two substring searches,
        # far cheaper than a regex over a big HMP reply.
        out = json.dumps(s)
        if "\\u" not in out and "\x7f" not in s:
            return out
    return '"' + _NEEDS_ESCAPE.sub(_escape_char, s) + '"'


def _double(v: float) -> str:
    if math.isnan(v):
        return "-nan" if math.copysign(1.0, v) < 0 else "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, ".17g")  # C printf("%.17g")


def _scalar(v: object) -> str:
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    if isinstance(v, str):
        return _quoted(v)
    if isinstance(v, int):
        return str(int(v))
    if isinstance(v, float):
        return _double(v)
    raise TypeError(f"cannot serialise {type(v).__name__} as QEMU JSON")


def to_qemu_json(value: object) -> str:
    """Compact JSON exactly as QEMU's json-writer prints it (no line terminator).

    Iterative, so deeply nested values (QMP allows 1024 levels) are fine.
    """
    parts: list[str] = []
    # Each entry: [iterator, is_dict, first]
    stack: list[list] = []
    v: object = value
    while True:
        if isinstance(v, dict):
            if v:
                parts.append("{")
                stack.append([iter(v.items()), True, True])
            else:
                parts.append("{}")
        elif isinstance(v, (list, tuple)):
            if v:
                parts.append("[")
                stack.append([iter(v), False, True])
            else:
                parts.append("[]")
        else:
            parts.append(_scalar(v))
        # Find the next value to write, closing finished containers.
        while stack:
            top = stack[-1]
            try:
                item = next(top[0])
            except StopIteration:
                stack.pop()
                parts.append("}" if top[1] else "]")
                continue
            if top[2]:
                top[2] = False
            else:
                parts.append(", ")
            if top[1]:
                key, v = item
                if not isinstance(key, str):
                    raise TypeError(f"QEMU JSON object keys must be str, not {type(key).__name__}")
                parts.append(_quoted(key))
                parts.append(": ")
            else:
                v = item
            break
        else:
            return "".join(parts)
