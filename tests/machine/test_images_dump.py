"""write_core: QEMU byte compatibility (fixtures), round trips, streaming, filter, class rule."""

from __future__ import annotations

import io
import struct

import pytest
from elftools.elf.elffile import ELFFile

from sevmon.machine.dump import CHUNK, PN_XNUM, build_notes, dump_layout, write_core
from sevmon.machine.images import apply_cpu_json, load_core
from sevmon.memory.ram import PAGE_SIZE
from sevmon.x86.cpu import CpuState
from tests.conftest import FIXTURES

GUESTS = ("linux-4level", "linux-pae", "linux-32bit")

def _note_segment(data: bytes) -> bytes:
    phoff = struct.unpack_from("<Q", data, 32)[0]
    p_type, _fl, off, _va, _pa, filesz, _ms, _al = struct.unpack_from("<IIQQQQQQ", data, phoff)
    assert p_type == 4
    return data[off:off + filesz]


@pytest.mark.parametrize("guest", GUESTS)
def test_notes_are_byte_identical_to_qemus(guest):
    data = (FIXTURES / guest / "core.elf").read_bytes()
    im = load_core(str(FIXTURES / guest / "core.elf"))
    apply_cpu_json(im, str(FIXTURES / guest / "cpu.json"))
    assert build_notes(im.cpus, long_mode=guest == "linux-4level") == _note_segment(data)


@pytest.mark.parametrize("guest", GUESTS)
def test_whole_fixture_core_is_reproduced(guest):
    """Same registers + same RAM runs -> the very bytes of the fixture core.

    The 32-bit fixtures are ELF64/EM_386 because QEMU counts the BIOS ROM just below
    4 GiB as a RAM block; our runs exclude it, so we pass elf_class=64 there.
    """
    data = (FIXTURES / guest / "core.elf").read_bytes()
    im = load_core(str(FIXTURES / guest / "core.elf"))
    apply_cpu_json(im, str(FIXTURES / guest / "cpu.json"))
    runs = [(pfn << 12, n << 12) for pfn, n in im.ram.runs()]
    out = io.BytesIO()
    elf_class = None if guest == "linux-4level" else 64
    n = write_core(out, im.cpus, runs, im.ram.read, elf_class=elf_class)
    assert n == len(data)
    assert out.getvalue() == data
    if guest != "linux-4level":
        assert dump_layout(im.cpus, runs)["elf_class"] == 32  # QEMU's rule without the ROM


def _cpu64(index: int) -> CpuState:
    cpu = CpuState(index=index)
    cpu.update({
        "rax": 0x1111 + index, "rbx": 2, "rcx": 3, "rdx": 4, "rsi": 5, "rdi": 6, "rbp": 7,
        "rsp": 0xFFFFFFFF81000000, "r8": 8, "r15": 0xF0F0F0F0F0F0F0F0, "rip": 0xFFFFFFFF8100ABCD,
        "rflags": 0x246, "cr0": 0x80050033, "cr2": 0x1234, "cr3": 0x29DA000, "cr4": 0x750EB0,
        "efer": 0xD01, "cs": 0x10, "cs_flags": 0x00AF9B00, "cs_limit": 0xFFFFFFFF,
        "ss": 0x18, "ss_flags": 0x00CF9300, "gs_base": 0xFFFF888000000000,
        "tr": 0x40, "tr_base": 0xFFFFFE0000003000, "tr_limit": 0x4087, "tr_flags": 0x8900,
        "gdt_base": 0xFFFFFE0000001000, "gdt_limit": 0x7F, "idt_base": 0xFFFFFE0000000000,
        "idt_limit": 0xFFF, "kernel_gs_base": 0x7F0000001000,
    })
    return cpu


def _pattern(gpa: int, n: int) -> bytes:
    # Deterministic, position-dependent bytes (period 251: every page differs).
    start = gpa % 251
    return (bytes(range(251)) * (n // 251 + 2))[start:start + n]


def test_round_trip_64bit_two_vcpus(tmp_path):
    cpus = [_cpu64(0), _cpu64(1)]
    runs = [(0, 0xA0000), (0x100000, 3 * PAGE_SIZE), (0x7000, PAGE_SIZE)]  # unsorted, overlaps merge
    calls = []

    def read(gpa, n):
        calls.append((gpa, n))
        return _pattern(gpa, n)

    progress = []
    path = tmp_path / "vm.elf"
    with open(path, "wb") as f:
        write_core(f, cpus, runs, read, lambda d, t: progress.append((d, t)))
    assert calls == [(0, 0xA0000), (0x100000, 3 * PAGE_SIZE)]
    assert progress[0] == (0, 0xA3000) and progress[-1] == (0xA3000, 0xA3000)

    im = load_core(str(path))
    assert (im.kind, im.machine) == ("elf64", "EM_X86_64")
    assert len(im.cpus) == 2
    for orig, got in zip(cpus, im.cpus, strict=True):
        assert got.index == orig.index
        for k, v in orig.regs.items():
            if k == "efer":
                continue  # not in QEMU's notes; inferred as LMA|LME
            assert got.get(k) == v, k
        assert got.efer == 0x500
    assert im.ram.read(0, 0xA0000) == _pattern(0, 0xA0000)
    assert im.ram.read(0x100000, 3 * PAGE_SIZE) == _pattern(0x100000, 3 * PAGE_SIZE)
    assert not im.ram.has(0xA0)
    with open(path, "rb") as f:
        elf = ELFFile(f)
        phdrs = [s.header for s in elf.iter_segments()]
    assert [p["p_type"] for p in phdrs] == ["PT_NOTE", "PT_LOAD", "PT_LOAD"]
    assert all(p["p_vaddr"] == 0 and p["p_flags"] == 0 and p["p_align"] == 0 for p in phdrs)


def test_round_trip_32bit(tmp_path):
    cpu = CpuState(index=0)
    cpu.update({"eax": 0x1AB40, "ebx": 0xC7C444C0, "eip": 0xC702AC33, "efl": 0x200246,
                "esp": 0xC7C3BF2C, "cr0": 0x80050033, "cr3": 0x1CFF000, "cr4": 0x350ED0,
                "cs": 0x60, "cs_flags": 0x00CF9A00, "cs_limit": 0xFFFFFFFF, "ds": 0x7B, "es": 0x7B,
                "fs": 0xD8, "fs_base": 0x7DE7000, "fs_flags": 0x078F93DE, "ss": 0x68,
                "gdt_base": 0xFF401000, "gdt_limit": 0xFF})
    runs = [(0, 0x9F000), (0x100000, 0x200000)]
    path = tmp_path / "vm32.elf"
    with open(path, "wb") as f:
        write_core(f, [cpu], runs, _pattern)
    im = load_core(str(path))
    assert (im.kind, im.machine) == ("elf32", "EM_386")
    got = im.cpus[0]
    for k, v in cpu.regs.items():
        assert got.get(k) == v, k
    assert got.efer == 0
    for gpa, n in runs:
        assert im.ram.read(gpa, n) == _pattern(gpa, n)
    # notes: i386 prstatus (144-byte desc) then the QEMU note
    with open(path, "rb") as f:
        notes = list(next(ELFFile(f).iter_segments()).iter_notes())
    assert [(n["n_name"], n["n_descsz"]) for n in notes] == [("CORE", 144), ("QEMU", 440)]


def test_class_rule_ram_above_4g_is_elf64_em386():
    cpu = CpuState()
    lay = dump_layout([cpu], [(0, 0x1000), (0x100000000, 0x1000)])
    assert (lay["elf_class"], lay["machine"]) == (64, 3)
    lay = dump_layout([cpu], [(0, 0x1000), (0xFFFFF000, 0x1000)])  # ends exactly at 4 GiB
    assert lay["elf_class"] == 64
    lay = dump_layout([cpu], [(0, 0x1000), (0xFFFFE000, 0x1000)])
    assert lay["elf_class"] == 32
    with pytest.raises(ValueError):
        dump_layout([_cpu64(0)], [(0, 0x1000)], elf_class=32)


def test_streaming_pieces_are_at_most_1mib():
    sizes = []

    class Sink(io.RawIOBase):
        def writable(self):
            return True

        def write(self, b):
            sizes.append(len(b))
            return len(b)

    def read(gpa, n):
        assert n <= CHUNK
        return bytes(n)

    total = 3 * CHUNK + 5 * PAGE_SIZE
    written = write_core(Sink(), [_cpu64(0)], [(0, total)], read)
    assert max(sizes) <= CHUNK
    assert written == sum(sizes)


def test_begin_length_filter(tmp_path):
    runs = [(0, 0x10000), (0x20000, 0x10000)]
    path = tmp_path / "f.elf"
    with open(path, "wb") as f:
        write_core(f, [_cpu64(0)], runs, _pattern, begin=0x8000, length=0x20000)
    im = load_core(str(path))
    assert sorted(im.ram.frames()) == list(range(8, 16)) + list(range(0x20, 0x28))
    assert im.ram.read(0x8000, 0x8000) == _pattern(0x8000, 0x8000)
    with pytest.raises(ValueError, match="Parameter 'length' is missing"):
        write_core(io.BytesIO(), [], runs, _pattern, begin=0)
    with pytest.raises(ValueError, match="Invalid parameter 'begin'"):
        write_core(io.BytesIO(), [], runs, _pattern, begin=0x40000, length=0x1000)


def test_more_than_pn_xnum_segments(tmp_path):
    runs = [(i * 2 * PAGE_SIZE, 16) for i in range(PN_XNUM)]
    path = tmp_path / "many.elf"
    with open(path, "wb") as f:
        write_core(f, [_cpu64(0)], runs, lambda g, n: b"\x5a" * n)
    with open(path, "rb") as f:
        elf = ELFFile(f)
        assert elf.header["e_phnum"] == PN_XNUM
        assert elf.num_segments() == PN_XNUM + 1
    im = load_core(str(path))
    assert len(im.ram) == PN_XNUM
    assert im.ram.read((PN_XNUM - 1) * 2 * PAGE_SIZE, 16) == b"\x5a" * 16
