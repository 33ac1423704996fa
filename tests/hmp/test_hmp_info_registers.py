"""info registers vs QEMU 7.2's own output for the fixture guests."""

from __future__ import annotations

import json
import re

import pytest

from sevmon.machine.images import apply_cpu_json, load_core
from sevmon.x86.cpu import CpuState
from sevmon.x86.info_registers import info_registers
from tests.conftest import FIXTURES

GUESTS = ("linux-4level", "linux-pae", "linux-32bit")
# Lines whose content sevmon cannot know from a memory image (FPU/vector data).
UNKNOWABLE = re.compile(r"^(FPR\d|YMM\d\d|XMM\d\d|ZMM\d\d|Opmask)")


def _load(guest: str) -> CpuState:
    im = load_core(str(FIXTURES / guest / "core.elf"))
    apply_cpu_json(im, str(FIXTURES / guest / "cpu.json"))
    return im.cpus[0]


def _want(guest: str) -> str:
    return json.loads((FIXTURES / guest / "hmp.json").read_text())["info registers"]


@pytest.mark.parametrize("guest", GUESTS)
def test_reproducible_lines_match_byte_for_byte(guest):
    got = info_registers(_load(guest)).replace("\n", "\r\n")
    want = _want(guest)
    assert got.startswith("\r\nCPU#0\r\n")
    got_lines, want_lines = got.split("\r\n"), want.split("\r\n")
    assert len(got_lines) == len(want_lines)
    compared = 0
    for g, w in zip(got_lines, want_lines, strict=True):
        if UNKNOWABLE.match(w):
            assert g.split("=")[0] == w.split("=")[0] and len(g) == len(w)  # same layout, value unknown
            continue
        assert g == w
        compared += 1
    assert compared >= 20


@pytest.mark.parametrize("guest", GUESTS)
def test_whole_output_matches_when_vector_state_is_supplied(guest):
    """Feed the unknowable values back in: then every byte matches (checks their layout)."""
    cpu = _load(guest)
    want = _want(guest)
    for m in re.finditer(r"YMM(\d\d)=(\w{16}) (\w{16}) (\w{16}) (\w{16})", want):
        cpu.set(f"xmm{int(m[1])}", int(m[2] + m[3] + m[4] + m[5], 16))
    for m in re.finditer(r"FPR(\d)=(\w{16}) (\w{4})", want):
        cpu.set(f"fpr{m[1]}", int(m[3] + m[2], 16))
    assert info_registers(cpu).replace("\n", "\r\n") == want


def test_layout_switches():
    cpu = CpuState(index=2)
    cpu.update({"cr0": 0x11, "efer": 0, "cs": 0x8, "cs_flags": 0x00CF9B00, "ss_flags": 0x00CF9300,
                "rflags": 0x2 | 0x400 | 0x800 | 0x80 | 0x10 | 0x1})
    text = info_registers(cpu)
    assert text.startswith("\nCPU#2\nEAX=00000000 ")
    assert "EFL=00000c93 [DOS-A-C] CPL=0" in text
    assert "CS =0008 00000000 00000000 00cf9b00 DPL=0 CS32 [-RA]\n" in text
    assert "ES =0000 00000000 00000000 00000000\n" in text  # not present: no DPL/type
    assert "GDT=     00000000 00000000\n" in text
    assert "CR0=00000011 CR2=00000000 CR3=00000000 CR4=00000000\n" in text
    assert "XMM00=0000000000000000 0000000000000000 XMM01=" in text  # no OSXSAVE: SSE layout
    assert text.count("XMM") == 8
    # Compatibility mode: LMA without CS.L -> 32-bit GPRs, 64-bit descriptor tables.
    cpu.update({"efer": 0x500, "cr0": 0x80000011, "cr4": 0x20, "tr_flags": 0x8B00})
    text = info_registers(cpu)
    assert "EAX=" in text and "GDT=     0000000000000000 00000000\n" in text
    assert "DPL=0 TSS64-busy\n" in text
    # Real mode: no DPL column at all; DS16 because neither B nor LMA.
    cpu = CpuState()
    cpu.update({"ds_flags": 0x9300})
    assert "DS =0000 00000000 00000000 00009300\n" in info_registers(cpu)
    # AVX-512 XCR0 -> Opmask + ZMM lines (32 in 64-bit mode).
    cpu = CpuState()
    cpu.update({"xcr0": 0xE7, "efer": 0x500, "cs_flags": 0x00AF9B00, "cr0": 0x80000011})
    text = info_registers(cpu)
    assert text.count("Opmask") == 8 and text.count("ZMM") == 32
    assert "HLT=1" in text
