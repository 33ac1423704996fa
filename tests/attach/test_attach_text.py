"""QEMU 7.2's texts that attaching reads, parsed without QEMU: the flat view (where a RAM
backend sits in guest-physical space) and ``info registers`` (what the walkers need).
The samples are QEMU 7.2.22's own output (pc, 4 GiB in memory-backend-memfd ram0)."""

from __future__ import annotations

import mmap

import pytest

from sevmon.attach.info_registers_parser import parse_info_registers
from sevmon.attach.layout import RamRange, ram_ranges
from sevmon.attach.ram import MappedRAM
from sevmon.memory.ram import MemoryAccessError

FLAT_VIEW = """FlatView #0
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-00000000000c2fff (prio 0, ram): ram0
  00000000000c3000-00000000000e7fff (prio 0, rom): ram0 @00000000000c3000
  00000000000e8000-00000000000effff (prio 0, ram): ram0 @00000000000e8000
  00000000000f0000-00000000000fffff (prio 0, rom): ram0 @00000000000f0000
  0000000000100000-00000000bfffffff (prio 0, ram): ram0 @0000000000100000
  00000000fec00000-00000000fec00fff (prio 0, i/o): ioapic
  00000000fed00000-00000000fed003ff (prio 0, i/o): hpet
  00000000fee00000-00000000feefffff (prio 4096, i/o): apic-msi
  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios
  0000000100000000-000000013fffffff (prio 0, ram): ram0 @00000000c0000000

FlatView #1
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-0000000000000007 (prio 0, i/o): dma-chan
""".replace("\n", "\r\n")

REGISTERS = """RAX=0000000000000000 RBX=0000000000008000 RCX=00000000000008d4 RDX=0000000000010000
RSI=0000000000001000 RDI=00007faf156f472c RBP=00007faf156ec000 RSP=ffffd579405bbba0
R8 =0000000000008000 R9 =ffff8ee6401ba9c0 R10=0000000000000000 R11=0000000000000000
R12=0000000000008000 R13=ffff8ee641a60000 R14=0000000000010000 R15=ffffd579405bbc70
RIP=ffffffff84bc2a4a RFL=00040206 [-----P-] CPL=0 II=0 A20=1 SMM=0 HLT=0
ES =0000 0000000000000000 00000000 00000000
CS =0010 0000000000000000 ffffffff 00a09b00 DPL=0 CS64 [-RA]
SS =0018 0000000000000000 ffffffff 00c09300 DPL=0 DS   [-WA]
GS =0000 ffff8ee67bc00000 00000000 00000000
TR =0040 fffffe0000003000 00004087 00008900 DPL=0 TSS64-avl
GDT=     fffffe0000001000 0000007f
IDT=     fffffe0000000000 00000fff
CR0=80050033 CR2=00000000005794a9 CR3=0000000101c46000 CR4=00750eb0
DR6=00000000ffff0ff0 DR7=0000000000000400
EFER=0000000000000d01
FCW=037f FSW=0000 [ST=0] FTW=00 MXCSR=00001f80
FPR0=0000000000000000 0000 FPR1=0000000000000000 0000
YMM00=0000000000000000 0000000000000000 0000000000000000 0000000000000000
""".replace("\n", "\r\n")


def test_flat_view_gives_ram_below_and_above_4g_and_leaves_devices_out():
    assert ram_ranges(FLAT_VIEW, {"ram0"}) == [RamRange(0, 0xC0000000, "ram0", 0),
                                               RamRange(1 << 32, 1 << 30, "ram0", 0xC0000000)]
    assert ram_ranges(FLAT_VIEW, {"other"}) == []  # only the backends QEMU lists


def test_mapped_ram_reads_through_the_layout_and_refuses_holes():
    ranges = ram_ranges(FLAT_VIEW, {"ram0"})
    size = 5 << 30
    mm = mmap.mmap(-1, size)  # sparse anonymous stand-in for the backend
    try:
        mm[0xC0000000:0xC0000008] = b"ABOVE4G!"
        mm[0x1000:0x1004] = b"LOW!"
        ram = MappedRAM(ranges, {"ram0": mm}, 4 << 30)
        assert ram.read(1 << 32, 8) == b"ABOVE4G!" and ram.read(0x1000, 4) == b"LOW!"
        assert ram.has(0xBFFFF) and not ram.has(0xC0000) and not ram.has(0xFEC00) and ram.has(0x100000)
        assert list(ram.runs()) == [(0, 0xC0000), (0x100000, 0x40000)]
        with pytest.raises(MemoryAccessError) as e:
            ram.read(0xBFFFFFF8, 16)  # runs into the PCI hole
        assert e.value.gpa == 0xC0000000
        ram.write(0x13FFFFFF8, b"12345678")
        assert mm[0xFFFFFFF8:0x100000000] == b"12345678"
    finally:
        mm.close()


def test_info_registers_gives_what_the_walkers_and_dumps_use():
    cpu = parse_info_registers(REGISTERS, 0)
    assert cpu.paging_mode() == "4level"
    assert (cpu.cr3, cpu.cr4, cpu.efer, cpu.cr0) == (0x101C46000, 0x750EB0, 0xD01, 0x80050033)
    assert cpu.get("rsp") == 0xFFFFD579405BBBA0 and cpu.get("r8") == 0x8000 and cpu.get("rip") == 0xFFFFFFFF84BC2A4A
    assert cpu.get("rflags") == 0x40206
    assert (cpu.get("cs"), cpu.get("cs_flags"), cpu.get("gs_base")) == (0x10, 0xA09B00, 0xFFFF8EE67BC00000)
    assert (cpu.get("gdt_base"), cpu.get("idt_limit"), cpu.get("tr_limit")) == (0xFFFFFE0000001000, 0xFFF, 0x4087)
    assert not cpu.halted
