"""load_core / load_raw / apply_cpu_json: fixtures, sparse edges, error sentences."""

from __future__ import annotations

import io
import json
import os
import struct

import pytest

from sevmon.machine.dump import write_core
from sevmon.machine.images import ImageError, apply_cpu_json, load_core, load_image, load_raw
from sevmon.memory.ram import PAGE_SIZE, MemoryAccessError
from sevmon.x86.cpu import CpuState
from tests.conftest import FIXTURES

GUESTS = ("linux-4level", "linux-pae", "linux-32bit")

def _phdrs(data: bytes):
    phoff = struct.unpack_from("<Q", data, 32)[0]
    phnum = struct.unpack_from("<H", data, 56)[0]
    return [struct.unpack_from("<IIQQQQQQ", data, phoff + 56 * i) for i in range(phnum)]


@pytest.mark.parametrize("guest", GUESTS)
def test_fixture_core_loads_every_pt_load_page(guest):
    path = FIXTURES / guest / "core.elf"
    data = path.read_bytes()
    im = load_core(str(path))
    assert im.kind == "elf64"
    assert im.machine == ("EM_X86_64" if guest == "linux-4level" else "EM_386")
    expected_pfns = set()
    for p_type, _fl, off, _va, pa, filesz, _memsz, _al in _phdrs(data):
        if p_type != 1:
            continue
        assert im.ram.read(pa, filesz) == data[off:off + filesz]
        expected_pfns.update(range(pa >> 12, (pa + filesz + PAGE_SIZE - 1) >> 12))
    assert set(im.ram.frames()) == expected_pfns
    end = max(pa + memsz for t, _f, _o, _v, pa, _fs, memsz, _a in _phdrs(data) if t == 1)
    assert im.ram_size == -(-end // PAGE_SIZE) * PAGE_SIZE
    with pytest.raises(MemoryAccessError):
        im.ram.read(0xFEE00000, 8)  # the local APIC is not RAM


@pytest.mark.parametrize("guest", GUESTS)
def test_fixture_registers_match_cpu_json(guest):
    im = load_core(str(FIXTURES / guest / "core.elf"))
    assert len(im.cpus) == 1 and im.cpus[0].index == 0
    ref = json.loads((FIXTURES / guest / "cpu.json").read_text())
    cpu = im.cpus[0]
    for k, v in ref.items():
        if k == "efer":
            continue
        assert cpu.get(k) == int(v, 16), k
    # EFER is not in the notes: inferred only for the EM_X86_64 core.
    assert cpu.efer == (0x500 if guest == "linux-4level" else 0)
    apply_cpu_json(im, str(FIXTURES / guest / "cpu.json"))
    assert cpu.efer == int(ref["efer"], 16)


def test_fixture_segments_from_qemu_note():
    cpu = load_core(str(FIXTURES / "linux-4level" / "core.elf")).cpus[0]
    assert (cpu.get("cs"), cpu.get("cs_limit"), cpu.get("cs_flags")) == (0x10, 0xFFFFFFFF, 0x00AF9B00)
    assert cpu.get("gs_base") == 0xFFFF8E9C4F800000
    assert (cpu.get("tr"), cpu.get("tr_base"), cpu.get("tr_limit")) == (0x40, 0xFFFFFE0000003000, 0x4087)
    assert (cpu.get("gdt_base"), cpu.get("gdt_limit")) == (0xFFFFFE0000001000, 0x7F)
    assert (cpu.get("idt_base"), cpu.get("idt_limit")) == (0xFFFFFE0000000000, 0xFFF)
    assert cpu.paging_mode() == "4level"


def test_partial_pages_at_segment_edges(tmp_path):
    cpu = CpuState(regs={"rip": 0x1234})
    blob = bytes(range(256)) * 47  # 12032 bytes, neither end page aligned
    runs = [(0x10800, len(blob))]

    def read(gpa, n):
        return blob[gpa - 0x10800:gpa - 0x10800 + n]

    path = tmp_path / "edge.elf"
    with open(path, "wb") as f:
        write_core(f, [cpu], runs, read)
    im = load_core(str(path))
    assert im.kind == "elf32"
    assert sorted(im.ram.frames()) == [0x10, 0x11, 0x12, 0x13]
    assert im.ram.read(0x10800, len(blob)) == blob
    assert im.ram.read(0x10000, 0x800) == bytes(0x800)  # zero-filled around the covered bytes
    end = 0x10800 + len(blob)
    assert im.ram.read(end, 0x14000 - end) == bytes(0x14000 - end)
    assert im.ram_size == 0x14000  # 0x13700 rounded up


def test_core_without_notes_gets_one_blank_vcpu(tmp_path):
    # Hand-built ELF64 core: one PT_LOAD, no PT_NOTE.
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 4, 62, 1, 0, 64, 0, 0,
                       64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 0, 120, 0, 0x2000, 4096, 4096, 0)
    path = tmp_path / "bare.elf"
    path.write_bytes(ehdr + phdr + b"\xab" * 4096)
    im = load_core(str(path))
    assert len(im.cpus) == 1 and im.cpus[0].regs == {}
    assert im.ram.read(0x2000, 4) == b"\xab" * 4


def test_raw_image_keeps_zero_pages_and_pads_last_page(tmp_path):
    path = tmp_path / "ram.bin"
    data = bytes(PAGE_SIZE) + b"\x11" * PAGE_SIZE + b"\x22" * 100
    path.write_bytes(data)
    im = load_raw(str(path))
    assert im.kind == "raw" and im.ram_size == 3 * PAGE_SIZE  # whole pages: the short one is padded
    assert sorted(im.ram.frames()) == [0, 1, 2]
    assert im.ram.read(0, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert im.ram.read(0x2000, PAGE_SIZE) == b"\x22" * 100 + bytes(PAGE_SIZE - 100)
    assert len(im.cpus) == 1
    capped = load_raw(str(path), ram_size=PAGE_SIZE)
    assert sorted(capped.ram.frames()) == [0] and capped.ram_size == PAGE_SIZE
    assert load_image(str(path)).kind == "raw"


def test_raw_256mib_loads_whole(tmp_path):
    """Every page of a 256 MiB image is RAM (speed is sevmon bench's business, not a timed test)."""
    path = tmp_path / "big.bin"
    with open(path, "wb") as f:
        f.truncate(256 << 20)
        f.seek(123 * PAGE_SIZE + 5)
        f.write(b"marker")
    im = load_raw(str(path))
    assert len(im.ram) == 65536
    assert im.ram.read(123 * PAGE_SIZE + 5, 6) == b"marker"


def test_apply_cpu_json_merges_into_vcpu0(tmp_path):
    p = tmp_path / "cpu.json"
    p.write_text(json.dumps({"cr3": "0x1000", "efl": "0x202", "eax": 5, "efer": "0xd01"}))
    bare = tmp_path / "r.bin"
    bare.write_bytes(bytes(PAGE_SIZE))
    im = load_raw(str(bare))
    cpu = apply_cpu_json(im, str(p))
    assert cpu is im.cpus[0]
    assert (cpu.cr3, cpu.get("rflags"), cpu.get("rax"), cpu.efer) == (0x1000, 0x202, 5, 0xD01)


# -- error sentences ------------------------------------------------------------------
def _err(fn, *args) -> str:
    with pytest.raises(ImageError) as ei:
        fn(*args)
    msg = str(ei.value)
    assert "\n" not in msg and "Traceback" not in msg
    return msg


def _good_core() -> bytes:
    f = io.BytesIO()
    write_core(f, [CpuState(regs={"cr0": 0x80000011, "cr4": 0x20, "efer": 0x500})],
               [(0, 2 * PAGE_SIZE)], lambda g, n: bytes(n))
    return f.getvalue()


def test_error_sentences(tmp_path):
    missing = str(tmp_path / "core.elf")
    assert _err(load_core, missing) == f"{missing}: no such file"
    assert _err(load_raw, missing) == f"{missing}: no such file"
    assert _err(load_core, str(tmp_path)) == f"{tmp_path}: is a directory"

    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    assert _err(load_core, str(text)) == f"{text}: not an ELF file"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert _err(load_core, str(empty)) == f"{empty}: not an ELF file"
    assert _err(load_raw, str(empty)) == f"{empty}: the file is empty"

    good = _good_core()

    def variant(name: str, data: bytes) -> str:
        p = tmp_path / name
        p.write_bytes(data)
        return _err(load_core, str(p))

    b = bytearray(good)
    b[16] = 2  # ET_EXEC
    assert variant("exec.elf", bytes(b)).endswith(": not an ELF core dump (type ET_EXEC)")
    b = bytearray(good)
    b[18] = 183  # EM_AARCH64
    assert variant("arm.elf", bytes(b)).endswith(": not an x86 core dump (machine EM_AARCH64)")
    b = bytearray(good)
    b[5] = 2
    assert "not a little-endian ELF file" in variant("be.elf", bytes(b))
    assert variant("hdr.elf", good[:30]).endswith(": truncated ELF core (the ELF header is incomplete)")
    assert "program headers end past the end of the file" in variant("ph.elf", good[:100])
    msg = variant("cut.elf", good[:-100])
    assert "truncated ELF core (the PT_LOAD for guest-physical 0x0" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_permission_denied_sentence(tmp_path):
    p = tmp_path / "locked.elf"
    p.write_bytes(b"\x7fELF")
    p.chmod(0)
    try:
        assert _err(load_core, str(p)) == f"{p}: permission denied"
    finally:
        p.chmod(0o600)


def test_cpu_json_error_sentences(tmp_path):
    bare = tmp_path / "r.bin"
    bare.write_bytes(bytes(PAGE_SIZE))
    im = load_raw(str(bare))
    cases = {
        "bad.json": ("{not json", "not valid JSON"),
        "list.json": ("[1, 2]", "expected a JSON object of register names to values"),
        "val.json": ('{"cr3": "0xzz"}', "register 'cr3' has a value that is not a number: '0xzz'"),
        "type.json": ('{"cr3": [1]}', "register 'cr3' must be a hex string or an integer"),
    }
    for name, (text, want) in cases.items():
        p = tmp_path / name
        p.write_text(text)
        msg = _err(apply_cpu_json, im, str(p))
        assert msg.startswith(f"{p}: ") and want in msg, msg
    assert _err(apply_cpu_json, im, str(tmp_path / "nope.json")).endswith("nope.json: no such file")
