"""QEMU's HMP expression parser: values, precedence, positions, registers, error texts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sevmon.hmp.errors import HmpError
from sevmon.hmp.expr import check_int_arg, monitor_reg_lookup, parse_expr
from sevmon.x86.cpu import CpuState

NOREG = lambda name: None  # noqa: E731


def ev(text: str, get_reg=NOREG) -> int:
    return parse_expr(text, 0, get_reg)[0]


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("42", 42), ("0x1F", 31), ("0X1f", 31), ("010", 8), ("0777", 511),
    ("0xffffffffffffffff", -1), ("18446744073709551615", -1), ("0x8000000000000000", -(1 << 63)),
    ("  7", 7), ("1+2", 3), ("7-10", -3), ("2*3+4", 10), ("2+3*4", 14),
    ("1+2&3", 3), ("(1+2)&3", 3), ("6|1+1", 8), ("1+6|1", 8), ("12^5*2", 6),
    ("-5", -5), ("--5", 5), ("+5", 5), ("~0", -1), ("-(2+3)*2", -10), ("( 1 + 2 ) * 3", 9),
    ("7/2", 3), ("-7/2", -3), ("7/-2", -3), ("-7%3", -1), ("7%-3", 1),
    ("'A'", 65), ("'A'+1", 66), ("' '", 32),
    ("0x7fffffffffffffff+1", -(1 << 63)), ("0x8000000000000000*2", 0),
    ("0x8000000000000000/-1", -(1 << 63)),
])
def test_values(text, value):
    assert ev(text) == value


def test_positions_stop_at_first_unusable_char():
    assert parse_expr("0x1000 junk", 0, NOREG) == (0x1000, 7)
    assert parse_expr("x /4xg 0x10+8  ", 7, NOREG) == (0x18, 15)
    assert parse_expr("09", 0, NOREG) == (0, 1)  # strtoull: "0" then '9' is not octal
    assert parse_expr("0xg", 0, NOREG) == (0, 1)  # "0x" without a hex digit parses "0"
    assert parse_expr("5)", 0, NOREG) == (5, 1)
    assert parse_expr("1 2", 0, NOREG) == (1, 2)


@pytest.mark.parametrize("text, msg", [
    ("", "unexpected end of expression"),
    ("   ", "unexpected end of expression"),
    ("1+", "unexpected end of expression"),
    ("(1+2", "')' expected"),
    ("(1+2]", "')' expected"),
    ("'", "character constant expected"),
    ("'ab'", "missing terminating ' character"),
    ("'a", "missing terminating ' character"),
    ("$nosuch", "unknown register"),
    ("$", "unknown register"),
    ("18446744073709551616", "number too large"),
    ("0x10000000000000000", "number too large"),
    ("zz", "invalid char 'z' in expression"),
    ("1+*2", "invalid char '*' in expression"),
    ("4/0", "division by zero"),
    ("4%(1-1)", "division by zero"),
])
def test_error_texts(text, msg):
    with pytest.raises(HmpError) as ei:
        parse_expr(text, 0, NOREG)
    assert str(ei.value) == msg


def test_int_args():
    assert check_int_arg(0xFFFFFFFF, "ioport") == 0xFFFFFFFF
    for bad in (1 << 32, -1):
        with pytest.raises(HmpError) as ei:
            check_int_arg(bad, "sum")
        assert str(ei.value) == "'sum' has failed: integer is for 32-bit values"


def _cpu() -> CpuState:
    cpu = CpuState()
    cpu.update({"rax": 0x1AD40, "rsp": 0xFFFFFFFFB4A03E90, "rbp": 0x10, "r15": 0x14790,
                "rip": 0xFFFFFFFFB3A0CF9B, "rflags": 0x246, "cs": 0x10, "cs_base": 0x1000,
                "cs_limit": 0xFFFFFFFF, "fs_base": 0x7F0012340000, "gs": 0x2B})
    return cpu


def test_x86_monitor_defs():
    reg = monitor_reg_lookup(_cpu())
    assert ev("$eax", reg) == 0x1AD40
    assert ev("$esp", reg) == ev("$sp", reg) == 0xFFFFFFFFB4A03E90 - (1 << 64)  # target_long
    assert ev("$fp", reg) == ev("$ebp", reg) == 0x10
    assert ev("$r15", reg) == 0x14790
    assert ev("$eflags", reg) == 0x246
    assert ev("$eip", reg) == 0xFFFFFFFFB3A0CF9B - (1 << 64)
    assert ev("$pc", reg) == 0xFFFFFFFFB3A0CF9B + 0x1000 - (1 << 64)
    assert ev("$cs", reg) == 0x10 and ev("$gs", reg) == 0x2B
    assert ev("$cs.limit", reg) == -1  # MD_I32: sign-extended
    assert ev("$fs.base", reg) == 0x7F0012340000
    assert ev("$eax + 0x10 * 2", reg) == 0x1AD60
    assert ev("$eax+$r15", reg) == 0x1AD40 + 0x14790
    for name in ("rax", "rip", "EAX", "cr3", "r16", "cs.selector", "efer"):
        with pytest.raises(HmpError, match="^unknown register$"):
            ev(f"${name}", reg)
    with pytest.raises(HmpError, match="^unknown register$"):
        ev("$eax", monitor_reg_lookup(None))


def test_register_token_and_trailing_space():
    reg = monitor_reg_lookup(_cpu())
    assert parse_expr("$eax   rest", 0, reg) == (0x1AD40, 7)


@given(st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_numbers_round_trip(n):
    s64 = n - (1 << 64) if n >> 63 else n
    assert ev(str(n)) == s64
    assert ev(hex(n)) == s64
    assert ev("0" + format(n, "o")) == s64


@given(st.integers(-(1 << 40), 1 << 40), st.integers(-(1 << 40), 1 << 40).filter(bool))
def test_c_division_semantics(a, b):
    q = ev(f"({a})/({b})")
    r = ev(f"({a})%({b})")
    assert q * b + r == a
    assert abs(r) < abs(b) and (r == 0 or (r < 0) == (a < 0))
