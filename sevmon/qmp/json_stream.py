"""A faithful model of QEMU 7.2's JSON input path for QMP.

QEMU splits the work into three layers, and so does this module:

* the **lexer** (``qobject/json-lexer.c``): a byte-level state machine that
  cuts the input into tokens, and on a lexical error emits a ``JSON_ERROR``
  token and enters a *recovery* state that skips bytes until a plausible
  resynchronisation point;
* the **streamer** (``qobject/json-streamer.c``): counts ``{}``/``[]`` depth,
  queues tokens until the depth returns to zero (or goes negative), enforces
  the token-size / token-count / nesting limits, and turns lexical errors
  into ``JSON parse error, stray '...'``;
* the **parser** (``qobject/json-parser.c``): a recursive-descent parser over
  one message's tokens.  Here it is an equivalent push-down automaton fed one
  token at a time (no Python recursion, so arbitrarily deep input is safe);
  like QEMU's parser, the first error wins and is reported only once the
  streamer decides the message is complete.

The input is a byte stream; newlines are not delimiters.  Interpolation
(``%d`` ...) is disabled, as for QMP, so ``%`` is a lexical error.

Error descriptions are Python strings holding exactly the text QEMU puts in
the ``desc`` member of its error reply *after* its JSON writer has decoded
the C string: bytes that are not valid (modified) UTF-8 appear as U+FFFD,
and a NUL byte ends the string (``stray ''`` for a NUL).
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["JSONParseError", "JSONStreamParser"]


@dataclass(frozen=True, slots=True)
class JSONParseError:
    """One JSON error, as QEMU reports it (a value object; never raised)."""

    desc: str


# --------------------------------------------------------------------------
# Token types (json-parser-int.h).  FORCED stands for the lexer flushing a
# partial token that outgrew the size limit: QEMU passes its *lexer state*
# as the token type then, which matches none of the streamer's cases.
# --------------------------------------------------------------------------
_ERROR = 0
_LCURLY = 1
_RCURLY = 2
_LSQUARE = 3
_RSQUARE = 4
_COLON = 5
_COMMA = 6
_INTEGER = 7
_FLOAT = 8
_KEYWORD = 9
_STRING = 10
_FORCED = 11

_SINGLE = {
    ord("{"): _LCURLY,
    ord("}"): _RCURLY,
    ord("["): _LSQUARE,
    ord("]"): _RSQUARE,
    ord(":"): _COLON,
    ord(","): _COMMA,
}

# Lexer states.
_START = 0
_RECOVERY = 1
_DQ = 2
_DQ_ESC = 3
_SQ = 4
_SQ_ESC = 5
_ZERO = 6
_SIGN = 7
_DIGITS = 8
_MANTISSA = 9
_MANTISSA_DIGITS = 10
_EXP_E = 11
_EXP_SIGN = 12
_EXP_DIGITS = 13
_KEYWORD_ST = 14

# Runs of bytes that keep the lexer in the same state (scanned in C by re).
_WS_RUN = re.compile(rb"[ \t\r\n]*")
# IN_RECOVERY skips 0x20..0xFD and '\t', except the six structural chars;
# it stops (without consuming) at other control chars, 0xFE, 0xFF, [ ] { } : ,
_RECOVERY_RUN = re.compile(rb"[\t\x20-\x2b\x2d-\x39\x3b-\x5a\x5c\x5e-\x7a\x7c\x7e-\xfd]*")
# Inside strings: ordinary bytes (0x20..0xFD except the quote and '\\'), and
# complete escape pairs ('\\' then any byte 0x20..0xFD; the parser judges it).
_DQ_RUN = re.compile(rb"[\x20\x21\x23-\x5b\x5d-\xfd]*(?:\\[\x20-\xfd][\x20\x21\x23-\x5b\x5d-\xfd]*)*")
_SQ_RUN = re.compile(rb"[\x20-\x26\x28-\x5b\x5d-\xfd]*(?:\\[\x20-\xfd][\x20-\x26\x28-\x5b\x5d-\xfd]*)*")
_DIGIT_RUN = re.compile(rb"[0-9]*")
_KEYWORD_RUN = re.compile(rb"[a-z]*")

_HEX4 = re.compile(rb"[0-9A-Fa-f]{4}")

# Unicode's 66 noncharacters, which QEMU's mod_utf8_codepoint() rejects.
_NONCHAR_RE = re.compile(
    "[\ufdd0-\ufdef" + "".join(chr(p * 0x10000 + 0xFFFE) + chr(p * 0x10000 + 0xFFFF) for p in range(17)) + "]"
)

_INT64_MIN = -(1 << 63)
_INT64_MAX = (1 << 63) - 1
_UINT64_MAX = (1 << 64) - 1

_SIMPLE_ESCAPES = {
    ord('"'): '"',
    ord("'"): "'",
    ord("\\"): "\\",
    ord("/"): "/",
    ord("b"): "\b",
    ord("f"): "\f",
    ord("n"): "\n",
    ord("r"): "\r",
    ord("t"): "\t",
}


# --------------------------------------------------------------------------
# Modified UTF-8 helpers (util/unicode.c)
# --------------------------------------------------------------------------
def _valid_codepoint(cp: int) -> bool:
    """util/unicode.c is_valid_codepoint() (negative -> invalid)."""
    if cp < 0 or cp > 0x10FFFF:
        return False
    if 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE:
        return False
    return not 0xD800 <= cp <= 0xDFFF


_MIN_CP = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)


def _mod_utf8_codepoint(b: bytes, pos: int) -> tuple[int, int]:
    """mod_utf8_codepoint() at b[pos] (b has no NUL): (codepoint or -1, end)."""
    byte = b[pos]
    p = pos + 1
    if byte < 0x80:
        return byte, p
    if byte >= 0xFE or not byte & 0x40:
        return -1, p  # impossible byte, or unexpected continuation byte
    length = 0
    mask = 0x80
    while byte & mask:
        length += 1
        mask >>= 1
    cp = byte & (mask - 1)
    n = len(b)
    for _ in range(1, length):
        if p >= n or (b[p] & 0xC0) != 0x80:
            return -1, p  # continuation byte missing
        cp = (cp << 6) | (b[p] & 0x3F)
        p += 1
    if cp > 0x10FFFF or 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE or 0xD800 <= cp <= 0xDFFF:
        return -1, p
    if cp < _MIN_CP[length - 2] and not (cp == 0 and length == 2):
        return -1, p  # overlong, except "\xC0\x80"
    return cp, p


def _qemu_utf8_errors(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    cp, end = _mod_utf8_codepoint(exc.object, exc.start)
    return ("\ufffd" if cp < 0 else chr(cp)), end


_ERRORS_NAME = "sevmon-qemu-mod-utf8"
codecs.register_error(_ERRORS_NAME, _qemu_utf8_errors)


def _c_string_text(b: bytes | bytearray) -> str:
    """The text QEMU's JSON writer produces for C string *b*.

    The string ends at the first NUL; every invalid modified-UTF-8 sequence
    (as delimited by mod_utf8_codepoint()) becomes one U+FFFD.
    """
    nul = b.find(b"\0")
    if nul >= 0:
        b = b[:nul]
    s = bytes(b).decode("utf-8", _ERRORS_NAME)
    if _NONCHAR_RE.search(s):
        s = _NONCHAR_RE.sub("\ufffd", s)
    return s


class _SyntaxError(Exception):
    """Internal: carries the raw message bytes of a parse_error()."""

    def __init__(self, message: bytes):
        super().__init__(message)
        self.message = message


def _parse_error_desc(message: bytes) -> str:
    # parse_error() formats into char message[1024] (vsnprintf truncates),
    # then error_setg(..., "JSON parse error, %s", message).
    return "JSON parse error, " + _c_string_text(message[:1023])


def _decode_raw(seg: bytes) -> str:
    """Decode unescaped string content as modified UTF-8, or raise."""
    try:
        s = seg.decode("utf-8")
    except UnicodeDecodeError:
        # The only sequence valid in modified UTF-8 but not in UTF-8 is the
        # two-byte NUL "\xC0\x80" (0xC0 is never a continuation byte, so
        # splitting on it cannot join or split other sequences).
        if b"\xc0\x80" not in seg:
            raise _SyntaxError(b"invalid UTF-8 sequence in string") from None
        try:
            s = "\0".join(part.decode("utf-8") for part in seg.split(b"\xc0\x80"))
        except UnicodeDecodeError:
            raise _SyntaxError(b"invalid UTF-8 sequence in string") from None
    if _NONCHAR_RE.search(s):
        raise _SyntaxError(b"invalid UTF-8 sequence in string")
    return s


def _cvt4hex(tok: bytes, pos: int) -> int:
    h = tok[pos : pos + 4]
    if _HEX4.fullmatch(h):
        return int(h, 16)
    return -1


def _parse_string(tok: bytes) -> str:
    """json-parser.c parse_string(): *tok* includes both quotes."""
    end = len(tok) - 1  # index of the closing quote
    pos = 1
    parts: list[str] = []
    while True:
        bs = tok.find(b"\\", pos, end)
        stop = end if bs < 0 else bs
        if stop > pos:
            parts.append(_decode_raw(tok[pos:stop]))
        if bs < 0:
            break
        esc = tok[bs + 1]
        simple = _SIMPLE_ESCAPES.get(esc)
        if simple is not None:
            parts.append(simple)
            pos = bs + 2
            continue
        if esc != ord("u"):
            raise _SyntaxError(b"invalid escape sequence in string")
        ptr = bs + 2
        cp = _cvt4hex(tok, ptr)
        ptr += 4
        if 0xD800 <= cp <= 0xDBFF and tok[ptr : ptr + 2] == b"\\u":
            # leading surrogate followed by \u
            cp = 0x10000 + ((cp & 0x3FF) << 10)
            trailing = _cvt4hex(tok, ptr + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                cp |= trailing & 0x3FF
                ptr += 6
            else:
                cp = -1
        if not _valid_codepoint(cp):
            # "%.*s is not a valid Unicode character": at most ptr - beg
            # bytes, but never past the end of the token (its NUL).
            raise _SyntaxError(tok[bs:ptr] + b" is not a valid Unicode character")
        parts.append(chr(cp))
        pos = ptr
    return "".join(parts)


def _parse_integer(tok: bytes) -> int | float:
    # QNUM_I64 if it fits, else QNUM_U64 (non-negative only), else double.
    if len(tok) <= 21:
        v = int(tok)
        if _INT64_MIN <= v <= _INT64_MAX:
            return v
        if tok[0] != ord("-") and v <= _UINT64_MAX:
            return v
    return float(tok)


# --------------------------------------------------------------------------
# Parser: json-parser.c as a push-down automaton
# --------------------------------------------------------------------------
# Frame states.  "*_FIRST": right after the opening bracket.
_O_FIRST = 0  # after '{': '}' or a key value
_O_KEY = 1  # after ',': a key value
_O_COLON = 2  # after the key: ':'
_O_VALUE = 3  # after ':': a value
_O_SEP = 4  # after a member: ',' or '}'
_A_FIRST = 5  # after '[': ']' or a value
_A_ELEM = 6  # after ',': a value
_A_SEP = 7  # after an element: ',' or ']'


class _Frame:
    __slots__ = ("container", "state", "key")

    def __init__(self, container: dict | list, state: int):
        self.container = container
        self.state = state
        self.key: str | None = None


class _Parser:
    """Parses one message's tokens; the first error wins, as in QEMU."""

    __slots__ = ("_stack", "_error", "_done", "_result")

    def __init__(self) -> None:
        self._stack: list[_Frame] = []
        self._error: bytes | None = None
        self._done = False
        self._result: object = None

    def push(self, ttype: int, tok: bytes | bytearray) -> None:
        if self._error is not None or self._done:
            return
        try:
            self._push(ttype, tok)
        except _SyntaxError as e:
            self._error = e.message

    def finish(self) -> object:
        if self._error is not None:
            return JSONParseError(_parse_error_desc(self._error))
        if not self._done:
            return JSONParseError("JSON parse error, premature EOI")
        return self._result

    def _push(self, ttype: int, tok: bytes | bytearray) -> None:
        stack = self._stack
        if stack:
            f = stack[-1]
            st = f.state
            if st == _O_COLON:
                if ttype != _COLON:
                    raise _SyntaxError(b"missing : in object pair")
                f.state = _O_VALUE
                return
            if st == _O_SEP:
                if ttype == _RCURLY:
                    stack.pop()
                    self._deliver(f.container)
                elif ttype == _COMMA:
                    f.state = _O_KEY
                else:
                    raise _SyntaxError(b"expected separator in dict")
                return
            if st == _A_SEP:
                if ttype == _RSQUARE:
                    stack.pop()
                    self._deliver(f.container)
                elif ttype == _COMMA:
                    f.state = _A_ELEM
                else:
                    raise _SyntaxError(b"expected separator in list")
                return
            if (st == _O_FIRST and ttype == _RCURLY) or (st == _A_FIRST and ttype == _RSQUARE):
                stack.pop()
                self._deliver(f.container)
                return
            # Every other state expects a value (parse_value()).
        if ttype == _LCURLY:
            stack.append(_Frame({}, _O_FIRST))
        elif ttype == _LSQUARE:
            stack.append(_Frame([], _A_FIRST))
        elif ttype == _STRING:
            self._deliver(_parse_string(bytes(tok)))
        elif ttype == _INTEGER:
            self._deliver(_parse_integer(bytes(tok)))
        elif ttype == _FLOAT:
            # strtod(): overflow gives inf, like float()
            self._deliver(float(tok))
        elif ttype == _KEYWORD:
            if tok == b"true":
                self._deliver(True)
            elif tok == b"false":
                self._deliver(False)
            elif tok == b"null":
                self._deliver(None)
            else:
                raise _SyntaxError(b"invalid keyword '" + bytes(tok[:1024]) + b"'")
        else:
            raise _SyntaxError(b"expecting value")

    def _deliver(self, value: object) -> None:
        """A value is complete: hand it to the enclosing container."""
        stack = self._stack
        if not stack:
            self._result = value
            self._done = True
            return
        f = stack[-1]
        st = f.state
        if st == _O_FIRST or st == _O_KEY:
            if not isinstance(value, str):
                raise _SyntaxError(b"key is not a string in object")
            f.key = value
            f.state = _O_COLON
        elif st == _O_VALUE:
            d = f.container
            if f.key in d:  # type: ignore[operator]
                raise _SyntaxError(b"duplicate key")
            d[f.key] = value  # type: ignore[index]
            f.state = _O_SEP
        else:  # _A_FIRST / _A_ELEM
            f.container.append(value)  # type: ignore[union-attr]
            f.state = _A_SEP


# --------------------------------------------------------------------------
# Lexer + streamer
# --------------------------------------------------------------------------
class JSONStreamParser:
    """Byte-stream JSON message splitter/parser behaving like QEMU 7.2's QMP input."""

    def __init__(
        self, max_token_size: int = 64 << 20, max_token_count: int = 2 << 20, max_nesting: int = 1024
    ):
        self._max_size = max_token_size
        self._max_count = max_token_count
        self._max_nesting = max_nesting
        self._out: list[object] = []
        self.reset()

    def reset(self) -> None:
        """Drop all partial state (QEMU re-initialises the parser on disconnect)."""
        # lexer
        self._state = _START
        self._tok = bytearray()
        # streamer
        self._brace = 0
        self._bracket = 0
        self._size = 0
        self._count = 0
        self._parser = _Parser()

    # ---------------------------------------------------------------- streamer
    def _emit(self, item: object) -> None:
        self._brace = 0
        self._bracket = 0
        self._size = 0
        self._count = 0
        self._parser = _Parser()
        self._out.append(item)

    def _token(self, ttype: int, tok: bytes | bytearray) -> None:
        """json-streamer.c json_message_process_token()."""
        if ttype == _LCURLY:
            self._brace += 1
        elif ttype == _RCURLY:
            self._brace -= 1
        elif ttype == _LSQUARE:
            self._bracket += 1
        elif ttype == _RSQUARE:
            self._bracket -= 1
        elif ttype == _ERROR:
            self._emit(JSONParseError("JSON parse error, stray '" + _c_string_text(tok) + "'"))
            return
        # Limits: checked before the token is queued.
        if self._size + len(tok) + 1 > self._max_size:
            self._emit(JSONParseError("JSON token size limit exceeded"))
            return
        if self._count + 1 > self._max_count:
            self._emit(JSONParseError("JSON token count limit exceeded"))
            return
        if self._bracket + self._brace > self._max_nesting:
            self._emit(JSONParseError("JSON nesting depth limit exceeded"))
            return
        self._size += len(tok)
        self._count += 1
        self._parser.push(ttype, tok)
        if (self._brace > 0 or self._bracket > 0) and self._brace >= 0 and self._bracket >= 0:
            return
        self._emit(self._parser.finish())

    # ------------------------------------------------------------------- lexer
    def _finish_token(self, ttype: int) -> None:
        tok = self._tok
        self._tok = bytearray()
        self._state = _START
        self._token(ttype, tok)

    def _lex_error(self) -> None:
        """The byte just appended to the token is not acceptable here."""
        tok = self._tok
        self._tok = bytearray()
        self._state = _RECOVERY
        self._token(_ERROR, tok)

    def _check_size(self) -> None:
        # json_lexer_feed_char(): "Do not let a single token grow to an
        # arbitrarily large size" -- flush it and restart at IN_START.
        if len(self._tok) > self._max_size:
            self._finish_token(_FORCED)

    def _grow(self, mv: memoryview, i: int, j: int) -> int:
        """Append mv[i:j] (bytes that keep the current state) to the token,
        honouring the per-byte size check; returns the new position."""
        room = self._max_size + 1 - len(self._tok)
        if j - i >= room:
            j = i + room
            self._tok += mv[i:j]
            self._finish_token(_FORCED)
            return j
        self._tok += mv[i:j]
        return j

    def _step(self, state: int, c: int) -> None:
        self._state = state
        self._tok.append(c)
        self._check_size()

    def _fail(self, c: int) -> None:
        self._tok.append(c)
        self._lex_error()

    def feed(self, data: bytes) -> list[object | JSONParseError]:
        """Feed raw bytes; return each complete top-level message, in order:
        a parsed Python value or a JSONParseError."""
        out: list[object] = []
        self._out = out
        if not isinstance(data, bytes):
            data = bytes(data)
        mv = memoryview(data)
        n = len(data)
        i = 0
        while i < n:
            st = self._state
            if st == _START:
                i = _WS_RUN.match(data, i).end()
                if i >= n:
                    break
                c = data[i]
                i += 1
                single = _SINGLE.get(c)
                if single is not None:
                    self._token(single, data[i - 1 : i])
                elif c == 0x22:
                    self._step(_DQ, c)
                elif c == 0x27:
                    self._step(_SQ, c)
                elif c == 0x30:
                    self._step(_ZERO, c)
                elif 0x31 <= c <= 0x39:
                    self._step(_DIGITS, c)
                elif c == 0x2D:
                    self._step(_SIGN, c)
                elif 0x61 <= c <= 0x7A:
                    self._step(_KEYWORD_ST, c)
                else:
                    self._fail(c)
            elif st == _RECOVERY:
                i = _RECOVERY_RUN.match(data, i).end()
                if i < n:
                    self._state = _START  # lookahead: reprocess data[i]
            elif st == _DQ or st == _SQ:
                j = (_DQ_RUN if st == _DQ else _SQ_RUN).match(data, i).end()
                if j > i:
                    i = self._grow(mv, i, j)
                    continue
                c = data[i]
                i += 1
                if c == (0x22 if st == _DQ else 0x27):
                    self._tok.append(c)
                    self._finish_token(_STRING)
                elif c == 0x5C:
                    self._step(_DQ_ESC if st == _DQ else _SQ_ESC, c)
                else:
                    self._fail(c)
            elif st == _DQ_ESC or st == _SQ_ESC:
                c = data[i]
                i += 1
                if 0x20 <= c <= 0xFD:
                    self._step(_DQ if st == _DQ_ESC else _SQ, c)
                else:
                    self._fail(c)
            elif st == _KEYWORD_ST:
                j = _KEYWORD_RUN.match(data, i).end()
                if j > i:
                    i = self._grow(mv, i, j)
                    continue
                self._finish_token(_KEYWORD)  # lookahead
            elif st == _DIGITS or st == _MANTISSA_DIGITS or st == _EXP_DIGITS:
                j = _DIGIT_RUN.match(data, i).end()
                if j > i:
                    i = self._grow(mv, i, j)
                    continue
                c = data[i]
                if st != _EXP_DIGITS and (c == 0x65 or c == 0x45):  # e E
                    i += 1
                    self._step(_EXP_E, c)
                elif st == _DIGITS and c == 0x2E:  # .
                    i += 1
                    self._step(_MANTISSA, c)
                else:
                    self._finish_token(_INTEGER if st == _DIGITS else _FLOAT)  # lookahead
            elif st == _ZERO:
                c = data[i]
                if 0x30 <= c <= 0x39:
                    i += 1
                    self._fail(c)
                elif c == 0x2E:
                    i += 1
                    self._step(_MANTISSA, c)
                else:
                    self._finish_token(_INTEGER)  # lookahead
            else:
                c = data[i]
                i += 1
                if st == _SIGN:
                    if c == 0x30:
                        self._step(_ZERO, c)
                    elif 0x31 <= c <= 0x39:
                        self._step(_DIGITS, c)
                    else:
                        self._fail(c)
                elif st == _MANTISSA:
                    if 0x30 <= c <= 0x39:
                        self._step(_MANTISSA_DIGITS, c)
                    else:
                        self._fail(c)
                elif st == _EXP_E:
                    if c == 0x2B or c == 0x2D:
                        self._step(_EXP_SIGN, c)
                    elif 0x30 <= c <= 0x39:
                        self._step(_EXP_DIGITS, c)
                    else:
                        self._fail(c)
                else:  # _EXP_SIGN
                    if 0x30 <= c <= 0x39:
                        self._step(_EXP_DIGITS, c)
                    else:
                        self._fail(c)
        self._out = []
        return out
