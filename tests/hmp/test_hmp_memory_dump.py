"""memory_dump / parse_fmt against QEMU 7.2's real outputs and its documented quirks."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sevmon.hmp.errors import HmpError
from sevmon.hmp.expr import parse_expr
from sevmon.hmp.memory_dump import FmtDefaults, memory_dump, parse_fmt, parse_fmt_at
from sevmon.machine.images import load_core
from sevmon.memory.ram import RAM, MemoryAccessError
from tests.conftest import FIXTURES

GUESTS = ("linux-4level", "linux-pae", "linux-32bit")
MMIO_PAGES = (0xFEE00000, 0xFEC00000)  # live device registers: not reproducible from an image


def _run(read, line: str, defaults: FmtDefaults, addr_width_bits: int = 64) -> str:
    """Run an ``x``/``xp`` command line the way the HMP layer will; return QMP's text."""
    cmd, rest = line.split(None, 1) if " " in line else (line, "")
    count, fmt, size, pos = parse_fmt_at(rest, 0, defaults)
    addr, pos = parse_expr(rest, pos, lambda name: None)
    lines = memory_dump(read, addr & (2**64 - 1), count, fmt, size,
                        virtual=cmd == "x", addr_width_bits=addr_width_bits)
    return "".join(lines).replace("\n", "\r\n")


def _fixture_samples(guest: str):
    hmp = json.loads((FIXTURES / guest / "hmp.json").read_text())
    im = load_core(str(FIXTURES / guest / "core.elf"))
    gva2gpa = {}
    for cmd, out in hmp.items():
        if cmd.startswith("gva2gpa ") and out.startswith("gpa: "):
            va = int(cmd.split()[1], 0)
            gva2gpa[va & ~0xFFF] = int(out.split()[1], 0) & ~0xFFF

    def vread(va: int, n: int) -> bytes:
        # Stub translator: only the sampled pages are mapped (the real walker is elsewhere).
        out = b""
        while n:
            page = gva2gpa.get(va & ~0xFFF)
            if page is None:
                raise MemoryAccessError(va)
            k = min(n, 0x1000 - (va & 0xFFF))
            out += im.ram.read(page | (va & 0xFFF), k)
            va, n = va + k, n - k
        return out

    return hmp, im, gva2gpa, vread


@pytest.mark.parametrize("guest", GUESTS)
def test_every_x_and_xp_sample(guest):
    hmp, im, gva2gpa, vread = _fixture_samples(guest)
    defaults = FmtDefaults()  # one QEMU process: sticky defaults carry over, in order
    checked = mmio = 0
    for line, want in hmp.items():
        if line.split()[0] not in ("x", "xp"):
            continue
        got = _run(vread if line.startswith("x ") else im.ram.read, line, defaults)
        addr = int(line.split()[-1], 0)
        gpa = addr if line.startswith("xp") else gva2gpa[addr & ~0xFFF]
        if gpa & ~0xFFF in MMIO_PAGES:
            prefix = want.split(":")[0]
            assert got == f"{prefix}: Cannot access memory\r\n"
            mmio += 1
            continue
        assert got == want, line
        checked += 1
    assert checked == 24 and mmio == 2


def test_transcript_samples():
    im = load_core(str(FIXTURES / "linux-4level" / "core.elf"))

    def vread(va, n):
        raise MemoryAccessError(va)  # gva2gpa 0x1000 is Unmapped in the fixture

    d = FmtDefaults()
    assert _run(vread, "x /4xg 0x1000", d) == "0000000000001000: Cannot access memory\r\n"
    assert _run(im.ram.read, "xp /2xg 0xfffffffffffff000", d) == "fffffffffffff000: Cannot access memory\r\n"
    assert _run(vread, "x /0xg 0", d) == ""
    with pytest.raises(HmpError, match=r"^invalid char in format: 'z'$"):
        _run(vread, "x /4zg 0", d)
    with pytest.raises(HmpError, match="^unexpected end of expression$"):
        _run(vread, "x /4xg", d)


def _ram(data: bytes, base: int = 0x1000) -> RAM:
    ram = RAM(0x100000)
    ram.write(base, data)
    return ram


def _dump(ram_or_read, addr, count, fmt, size, **kw) -> list[str]:
    read = ram_or_read.read if isinstance(ram_or_read, RAM) else ram_or_read
    kw.setdefault("virtual", False)
    return list(memory_dump(read, addr, count, fmt, size, **kw))


def test_formats_and_widths():
    ram = _ram(bytes([0xFF, 0xFE, 0x01, 0x80, 0x41, 0x27, 0x5C, 0x0A, 0x0D, 0x00, 0x7E, 0x20]) + bytes(52))
    assert _dump(ram, 0x1000, 4, "x", 1) == ["0000000000001000: 0xff 0xfe 0x01 0x80\n"]
    assert _dump(ram, 0x1000, 2, "d", 1) == ["0000000000001000: 255 254\n"]  # zero-extended
    assert _dump(ram, 0x1000, 1, "o", 2) == ["0000000000001000: 0177377\n"]  # '%#6o' overflows width
    assert _dump(ram, 0x1000, 1, "o", 4) == ["0000000000001000: 020000377377\n"]
    assert _dump(ram, 0x1009, 1, "o", 1) == ["0000000000001009:   0\n"]
    assert _dump(ram, 0x1000, 1, "u", 4) == ["0000000000001000: 2147614463\n"]
    assert _dump(ram, 0x1000, 1, "d", 8) == ["0000000000001000:   746514800510631679\n"]
    assert _dump(ram, 0x1004, 8, "c", 1) == [
        "0000000000001004: 'A' '\\'' '\\\\' '\\n' '\\r' '\\x00' '~' ' '\n"]
    ram.write(0x1000, b"\xff" * 8)
    assert _dump(ram, 0x1000, 1, "d", 8) == ["0000000000001000:                   -1\n"]
    assert _dump(ram, 0x1000, 1, "u", 8) == ["0000000000001000: 18446744073709551615\n"]
    assert _dump(ram, 0x1000, 1, "x", 8) == ["0000000000001000: 0xffffffffffffffff\n"]


def test_line_sizes():
    ram = _ram(bytes(range(64)))
    lines = _dump(ram, 0x1000, 10, "x", 1)
    assert [len(ln.split()) - 1 for ln in lines] == [8, 2]
    assert [ln[:17] for ln in lines] == ["0000000000001000:", "0000000000001008:"]
    assert [len(ln.split()) - 1 for ln in _dump(ram, 0x1000, 10, "x", 2)] == [8, 2]
    assert [len(ln.split()) - 1 for ln in _dump(ram, 0x1000, 6, "x", 4)] == [4, 2]
    assert [len(ln.split()) - 1 for ln in _dump(ram, 0x1000, 3, "x", 8)] == [2, 1]


def test_c_quirk_size_applied_before_wsize_becomes_1():
    ram = _ram(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ" + bytes(38))
    lines = _dump(ram, 0x1000, 4, "c", 4)  # sticky size w: 16 bytes, one 16-char line
    assert lines == ["0000000000001000: " + " ".join(f"'{c}'" for c in "ABCDEFGHIJKLMNOP") + "\n"]
    lines = _dump(ram, 0x1000, 3, "c", 1)
    assert lines == ["0000000000001000: 'A' 'B' 'C'\n"]


def test_count_zero_prints_nothing_and_reads_nothing():
    def read(a, n):
        raise AssertionError("must not read")

    assert _dump(read, 0, 0, "x", 8) == []


def test_cannot_access_stops_at_the_failing_line():
    ram = _ram(b"\x11" * 0x1000, base=0x1000)  # frame 1 only
    lines = _dump(ram, 0x1FE0, 6, "x", 8)
    assert lines == [
        "0000000000001fe0: 0x1111111111111111 0x1111111111111111\n",
        "0000000000001ff0: 0x1111111111111111 0x1111111111111111\n",
        "0000000000002000: Cannot access memory\n",
    ]
    # A line straddling the missing page fails as a whole.
    assert _dump(ram, 0x1FF8, 2, "x", 8) == ["0000000000001ff8: Cannot access memory\n"]


def test_reads_are_grouped_per_page_with_exact_fallback():
    ram = _ram(bytes(0x2000), base=0x1000)
    calls = []

    def read(a, n):
        calls.append((a, n))
        return ram.read(a, n)

    lines = _dump(read, 0x1F00, 64, "x", 8)  # 512 bytes across a page boundary
    assert len(lines) == 32
    assert calls == [(0x1F00, 0x100), (0x2000, 0x100)]
    assert all(n >= 16 for _, n in calls)


def test_a_wider_span_reads_contiguous_pages_at_once_and_falls_back_page_by_page():
    ram = _ram(b"\x11" * 0x2000, base=0x1000)  # 0x1000..0x3000 is RAM, 0x3000 is not
    calls = []

    def read(a, n):
        calls.append((a, n))
        return ram.read(a, n)

    assert len(_dump(read, 0x1F00, 64, "x", 8, span=1 << 20)) == 32
    assert calls == [(0x1F00, 0x200)]  # x over two pages: one read
    calls.clear()
    wide = _dump(read, 0x2F00, 64, "x", 8, span=1 << 20)
    assert wide == _dump(ram, 0x2F00, 64, "x", 8)  # the same lines, stopping at the same one
    assert wide[-1] == "0000000000003000: Cannot access memory\n"
    assert calls[:3] == [(0x2F00, 0x200), (0x2F00, 0x100), (0x3000, 0x100)]


def test_virtual_address_width():
    ram = _ram(b"\xaa" * 16)

    def vread(a, n):
        return ram.read(0x1000 + (a & 0xFFF), n)

    assert _dump(vread, 0xC0001000, 1, "x", 4, virtual=True)[0].startswith("00000000c0001000: ")
    assert _dump(vread, 0xC0001000, 1, "x", 4, virtual=True, addr_width_bits=32)[0] == "c0001000: 0xaaaaaaaa\n"
    # x: 64-bit target prints target_ulong with 16 digits; xp: always 16 digits
    assert _dump(ram, 0x1000, 1, "x", 1)[0] == "0000000000001000: 0xaa\n"


def test_format_i_is_reported_not_supported():
    assert _dump(lambda a, n: b"", 0, 5, "i", -1, virtual=True) == ["format 'i' is not supported by sevmon\n"]


# -- parse_fmt -------------------------------------------------------------------------
def test_parse_fmt_sticky_defaults():
    d = FmtDefaults()
    assert parse_fmt("", d) == (1, "x", 4)
    assert parse_fmt("/4xg", d) == (4, "x", 8)
    assert (d.format, d.size) == ("x", 8)
    assert parse_fmt("/16c", d) == (16, "c", 8)  # size is sticky from the last command
    assert parse_fmt("/d", d) == (1, "d", 8)
    assert parse_fmt("/b", d) == (1, "d", 1)  # format is sticky too
    assert parse_fmt("/3", d) == (3, "d", 1)
    assert parse_fmt("", d) == (1, "d", 1)
    assert parse_fmt("/xL", d) == (1, "x", 8)
    assert parse_fmt("/gbwh", d) == (1, "x", 2)  # last size letter wins
    assert parse_fmt("/10i", d) == (10, "i", -1)  # 'i' without size: -1, sticky size kept
    assert (d.format, d.size) == ("i", 2)
    assert parse_fmt("", d) == (1, "i", -1)
    assert parse_fmt("/iw", d) == (1, "i", 4)
    assert d.size == 2  # 'i' never updates the sticky size
    assert parse_fmt("/x", d) == (1, "x", 2)


def test_parse_fmt_positions_and_count():
    d = FmtDefaults()
    assert parse_fmt_at("  /4xg 0x1000", 0, d) == (4, "x", 8, 6)
    assert parse_fmt_at("0x1000", 0, d) == (1, "x", 8, 0)
    assert parse_fmt_at("/0xg 0", 0, d)[0] == 0
    assert parse_fmt_at("/007x", 0, d)[0] == 7
    assert parse_fmt_at("/4294967297xb", 0, d)[0] == 1  # C int wraps


@pytest.mark.parametrize("text, bad", [("/4zg", "z"), ("/x4", "4"), ("/4xg,", ","), ("/-1x", "-"),
                                       ("/xq", "q")])
def test_parse_fmt_errors(text, bad):
    d = FmtDefaults(format="o", size=2)
    with pytest.raises(HmpError) as ei:
        parse_fmt(text, d)
    assert str(ei.value) == f"invalid char in format: '{bad}'"
    assert (d.format, d.size) == ("o", 2)  # a failed parse leaves the defaults alone


@given(st.binary(min_size=0, max_size=300), st.integers(0, 40), st.sampled_from([1, 2, 4, 8]),
       st.integers(0, 0xFFF))
def test_hex_dump_round_trips_bytes(data, count, size, offset):
    ram = RAM(0x10000)
    ram.write(0x1000, bytes(0x1000) + bytes(0x1000))
    ram.write(0x1000 + offset, data)
    lines = _dump(ram, 0x1000 + offset, count, "x", size)
    line_size = 8 if size == 1 else 16
    assert len(lines) == -(-(count * size) // line_size)
    got = b"".join(int(tok, 16).to_bytes(size, "little")
                   for ln in lines for tok in ln.split()[1:])
    assert got == ram.read(0x1000 + offset, count * size)
    addrs = [int(ln.split(":")[0], 16) for ln in lines]
    assert addrs == [0x1000 + offset + i * line_size for i in range(len(lines))]
