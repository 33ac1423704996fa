"""Write a ``dump-guest-memory`` ELF core in QEMU 7.2's layout (paging off), and the
vCPU note formats shared with :mod:`sevmon.machine.images`.

Layout (as QEMU's dump/dump.c and target/i386/arch_dump.c produce it; facts re-derived,
not copied)::

    ELF header | PT_NOTE phdr | one PT_LOAD phdr per RAM run | notes | RAM bytes

* Class and machine follow ``cpu_get_dump_info``: if vCPU 0 has EFER.LMA the core is
  ELFCLASS64 / EM_X86_64, otherwise EM_386 and ELFCLASS32 -- unless some RAM block ends
  above 4 GiB - 1, which makes it ELFCLASS64 (still EM_386). NB: QEMU's PC machines count
  the BIOS ROM mapped just below 4 GiB as a RAM block, so a real QEMU dump of a 32-bit PC
  guest is ELF64/EM_386 (the fixtures are); pass ``elf_class=64`` to reproduce that when
  the runs you give exclude the ROM.
* Notes: first an ``NT_PRSTATUS`` ("CORE") per vCPU -- the x86_64 ``elf_prstatus`` when
  vCPU 0 is in long mode, the i386 one otherwise (also inside ELF64) -- with
  ``pr_pid = cpu index + 1``; then a "QEMU" note (type 0) per vCPU carrying
  ``QEMUCPUState`` version 1 (440 bytes: GPRs, rip, rflags, cs ds es fs gs ss ldt tr gdt
  idt as {selector, limit, flags, pad, base}, cr[5], kernel_gs_base).
* Then the guest's own note, where QEMU has one (``-device vmcoreinfo``, a Linux guest that registered its
  VMCOREINFO): QEMU copies Linux's ``vmcoreinfo_note`` out of guest memory after every vCPU note, and that note is
  name ``VMCOREINFO`` (namesz 11), type 0, descriptor the VMCOREINFO text (descsz its length, no NUL), name and
  descriptor each zero-padded to 4 bytes: :func:`vmcoreinfo_note` builds the very same bytes from the text (what
  ``crash`` and ``drgn -c`` read to find the kernel: release, KASLR offset, ``phys_base``, page tables).
* PT_NOTE and PT_LOAD have ``p_flags = 0``, ``p_align = 0``; PT_LOAD has ``p_vaddr = 0``
  (paging off), ``p_paddr`` = guest-physical address, ``p_filesz = p_memsz`` = run size.
  Touching runs are merged into one PT_LOAD (QEMU merges contiguous RAM blocks).
* sevmon's own addition, for SEV guests only (``alias_bit``, the C-bit): after QEMU's PT_LOADs, each run again at
  ``p_paddr | C-bit``, same file bytes. An SEV guest's page-table entries carry the C-bit, and kernel tools that take
  an entry's address bits as they are (drgn) then ask for that address; the hardware ignores the bit as an address
  bit, and so does this alias: the same frame, not a copy. Nothing in the guest's memory is changed. crash masks
  the bit itself (VMCOREINFO's ``NUMBER(sme_mask)``); sevmon's loader recognises the aliases as such.
* More than 65534 runs: ``e_phnum = PN_XNUM`` and one section header (index 0) whose
  ``sh_info`` holds the real count, placed after the program headers (the layout of the
  QEMU dump.c this was checked against; not verified against a 7.2 dump with that many
  runs).

``CpuState`` register names used here (and by the loader): ``rax``..``r15``, ``rip``,
``rflags``, ``cr0``..``cr4``, ``kernel_gs_base``; for each of ``cs ds es fs gs ss ldt tr``
the selector under the plain name (``cs``) plus ``cs_base``, ``cs_limit``, ``cs_flags``
(QEMU's raw SegmentCache flags); ``gdt_base``, ``gdt_limit``, ``idt_base``, ``idt_limit``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from typing import BinaryIO

from sevmon.x86.cpu import EFER_LMA, CpuState

EM_386 = 3
EM_X86_64 = 62
ET_CORE = 4
PT_LOAD = 1
PT_NOTE = 4
NT_PRSTATUS = 1
PN_XNUM = 0xFFFF
QEMUCPUSTATE_VERSION = 1
QEMUCPUSTATE_SIZE = 440

CHUNK = 1 << 20  # largest piece read from the guest / written to the file at once

SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr")  # QEMUCPUState order
_QEMU_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_X64_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10",
             "r9", "r8", "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax",
             "rip", "cs", "rflags", "rsp", "ss", "fs_base", "gs_base",
             "ds", "es", "fs", "gs")
_X64_PRSTATUS_SIZE = 336
_X64_REGS_OFF = 112
_X64_PID_OFF = 32
_I386_PRSTATUS_SIZE = 144
_I386_REGS_OFF = 72
_I386_PID_OFF = 24
_I386_REGS = struct.Struct("<7I8H2I2H2I2H")  # ebx..eax, ds..__gs, orig_eax eip, cs __cs, eflags esp, ss __ss
_QEMU_HEAD = struct.Struct("<II18Q")
_QEMU_SEG = struct.Struct("<IIIIQ")

_U64 = (1 << 64) - 1
_U32 = 0xFFFFFFFF


# -- notes ----------------------------------------------------------------------------
def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    namesz = len(name) + 1
    head = struct.pack("<III", namesz, len(desc), ntype)
    name_field = name + b"\0" * (-(-namesz // 4) * 4 - len(name))
    return head + name_field + desc + b"\0" * (-len(desc) % 4)


def vmcoreinfo_note(text: bytes) -> bytes:
    """The ``VMCOREINFO`` ELF note of a Linux guest whose VMCOREINFO text is ``text`` (the bytes the kernel wrote,
    up to its length): byte for byte the note Linux keeps in ``vmcoreinfo_note`` and QEMU copies into its dump."""
    return _note(b"VMCOREINFO", 0, text)


def prstatus_x86_64(cpu: CpuState, pid: int) -> bytes:
    """The x86_64 ``elf_prstatus`` descriptor (336 bytes)."""
    buf = bytearray(_X64_PRSTATUS_SIZE)
    struct.pack_into("<I", buf, _X64_PID_OFF, pid & _U32)
    vals = [0 if r == "orig_rax" else cpu.get(r) & _U64 for r in _X64_REGS]
    struct.pack_into("<27Q", buf, _X64_REGS_OFF, *vals)
    return bytes(buf)


def prstatus_i386(cpu: CpuState, pid: int) -> bytes:
    """The i386 ``elf_prstatus`` descriptor (144 bytes); registers truncated to 32 bits."""
    buf = bytearray(_I386_PRSTATUS_SIZE)
    struct.pack_into("<I", buf, _I386_PID_OFF, pid & _U32)
    g = lambda r: cpu.get(r) & _U32  # noqa: E731
    s = lambda r: cpu.get(r) & 0xFFFF  # noqa: E731
    _I386_REGS.pack_into(
        buf, _I386_REGS_OFF,
        g("rbx"), g("rcx"), g("rdx"), g("rsi"), g("rdi"), g("rbp"), g("rax"),
        s("ds"), 0, s("es"), 0, s("fs"), 0, s("gs"), 0,
        0, g("rip"), s("cs"), 0, g("rflags"), g("rsp"), s("ss"), 0,
    )
    return bytes(buf)


def qemu_cpustate(cpu: CpuState) -> bytes:
    """QEMU's ``QEMUCPUState`` (version 1, 440 bytes)."""
    out = bytearray(_QEMU_HEAD.pack(
        QEMUCPUSTATE_VERSION, QEMUCPUSTATE_SIZE,
        *(cpu.get(r) & _U64 for r in _QEMU_GPRS), cpu.get("rip") & _U64, cpu.get("rflags") & _U64,
    ))
    for seg in SEGMENTS:
        out += _QEMU_SEG.pack(cpu.get(seg) & _U32, cpu.get(f"{seg}_limit") & _U32,
                              cpu.get(f"{seg}_flags") & _U32, 0, cpu.get(f"{seg}_base") & _U64)
    for tbl in ("gdt", "idt"):
        out += _QEMU_SEG.pack(0, cpu.get(f"{tbl}_limit") & _U32, 0, 0, cpu.get(f"{tbl}_base") & _U64)
    out += struct.pack("<5Q", *(cpu.get(f"cr{i}") & _U64 for i in range(5)))
    out += struct.pack("<Q", cpu.get("kernel_gs_base") & _U64)
    assert len(out) == QEMUCPUSTATE_SIZE
    return bytes(out)


def build_notes(cpus: Sequence[CpuState], long_mode: bool) -> bytes:
    """The whole PT_NOTE payload: every vCPU's NT_PRSTATUS, then every vCPU's QEMU note. A vCPU whose registers
    are unknown (SEV-ES: encrypted in its VMSA) gets no note: a core carries no made-up register values."""
    cpus = [c for c in cpus if c.registers_known]
    out = bytearray()
    for cpu in cpus:
        pid = cpu.index + 1
        desc = prstatus_x86_64(cpu, pid) if long_mode else prstatus_i386(cpu, pid)
        out += _note(b"CORE", NT_PRSTATUS, desc)
    for cpu in cpus:
        out += _note(b"QEMU", 0, qemu_cpustate(cpu))
    return bytes(out)


def parse_prstatus(desc: bytes) -> tuple[int, dict[str, int]]:
    """``(pr_pid, registers)`` from an x86_64 (336-byte) or i386 (144-byte) NT_PRSTATUS."""
    if len(desc) >= _X64_PRSTATUS_SIZE:
        pid = struct.unpack_from("<I", desc, _X64_PID_OFF)[0]
        vals = struct.unpack_from("<27Q", desc, _X64_REGS_OFF)
        regs = {k: v for k, v in zip(_X64_REGS, vals, strict=True) if k != "orig_rax"}
        return pid, regs
    if len(desc) >= _I386_PRSTATUS_SIZE:
        pid = struct.unpack_from("<I", desc, _I386_PID_OFF)[0]
        (ebx, ecx, edx, esi, edi, ebp, eax, ds, _, es, _, fs, _, gs, _,
         _orig, eip, cs, _, eflags, esp, ss, _) = _I386_REGS.unpack_from(desc, _I386_REGS_OFF)
        return pid, {"rbx": ebx, "rcx": ecx, "rdx": edx, "rsi": esi, "rdi": edi, "rbp": ebp,
                     "rax": eax, "ds": ds, "es": es, "fs": fs, "gs": gs, "rip": eip, "cs": cs,
                     "rflags": eflags, "rsp": esp, "ss": ss}
    raise ValueError(f"NT_PRSTATUS note of {len(desc)} bytes is neither x86_64 (336) nor i386 (144)")


def parse_qemu_cpustate(desc: bytes) -> dict[str, int]:
    """Registers from a "QEMU" note (``QEMUCPUState`` v1; 432 bytes before kernel_gs_base)."""
    if len(desc) < 432:
        raise ValueError(f"QEMU note of {len(desc)} bytes is too short for QEMUCPUState")
    version, _size, *vals = _QEMU_HEAD.unpack_from(desc, 0)
    if version != QEMUCPUSTATE_VERSION:
        raise ValueError(f"QEMUCPUState version {version} is not supported")
    regs = dict(zip(_QEMU_GPRS, vals[:16], strict=True))
    regs["rip"], regs["rflags"] = vals[16], vals[17]
    off = _QEMU_HEAD.size
    for seg in SEGMENTS:
        sel, limit, flags, _pad, base = _QEMU_SEG.unpack_from(desc, off)
        regs[seg], regs[f"{seg}_limit"], regs[f"{seg}_flags"], regs[f"{seg}_base"] = sel, limit, flags, base
        off += _QEMU_SEG.size
    for tbl in ("gdt", "idt"):
        _sel, limit, _flags, _pad, base = _QEMU_SEG.unpack_from(desc, off)
        regs[f"{tbl}_limit"], regs[f"{tbl}_base"] = limit, base
        off += _QEMU_SEG.size
    crs = struct.unpack_from("<5Q", desc, off)
    for i, v in enumerate(crs):
        if i != 1 or v:
            regs[f"cr{i}"] = v
    off += 40
    if len(desc) >= off + 8:
        regs["kernel_gs_base"] = struct.unpack_from("<Q", desc, off)[0]
    return regs


# -- the writer -----------------------------------------------------------------------
def _merge_runs(runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for gpa, size in sorted((int(g), int(s)) for g, s in runs):
        if size <= 0:
            continue
        if out and gpa <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], gpa + size - out[-1][0])
        else:
            out.append([gpa, size])
    return [(g, s) for g, s in out]


def _filter_runs(runs: list[tuple[int, int]], begin: int, length: int) -> list[tuple[int, int]]:
    end = begin + length
    out = []
    for gpa, size in runs:
        lo, hi = max(gpa, begin), min(gpa + size, end)
        if lo < hi:
            out.append((lo, hi - lo))
    return out


def dump_layout(cpus: Sequence[CpuState], ram_runs: Iterable[tuple[int, int]], *,
                begin: int | None = None, length: int | None = None,
                elf_class: int | None = None, guest_note: bytes = b"", extra_notes: bytes = b"",
                alias_bit: int = 0) -> dict:
    """Work out what :func:`write_core` will write (class, machine, runs, offsets, size)."""
    if (begin is None) != (length is None):
        raise ValueError(f"Parameter '{'length' if length is None else 'begin'}' is missing")
    runs = _merge_runs(ram_runs)
    known = [c for c in cpus if c.registers_known]
    # an SEV-ES guest (registers unknown) is a 64-bit guest: its core is ELF64 with no register notes
    long_mode = bool(known[0].efer & EFER_LMA) if known else bool(cpus)
    if elf_class is None:
        elf_class = 64 if long_mode or any(g + s > _U32 for g, s in runs) else 32
    if elf_class not in (32, 64) or (elf_class == 32 and long_mode):
        raise ValueError(f"ELF class {elf_class} is not possible here")
    if begin is not None:
        if length <= 0:
            raise ValueError("Invalid parameter 'length'")
        runs = _filter_runs(runs, begin, length)
        if not runs:
            raise ValueError("Invalid parameter 'begin'")
    machine = EM_X86_64 if long_mode else EM_386
    ehsize, phentsize, shentsize = (64, 56, 64) if elf_class == 64 else (52, 32, 40)
    alias = alias_bit if elf_class == 64 and not any((g + s - 1) & alias_bit for g, s in runs) else 0
    phdr_num = 1 + len(runs) * (2 if alias else 1)
    have_section = phdr_num >= PN_XNUM
    notes = build_notes(cpus, long_mode) + guest_note + extra_notes
    note_offset = ehsize + phentsize * phdr_num + (shentsize if have_section else 0)
    memory_offset = note_offset + len(notes)
    total = sum(s for _, s in runs)
    return {
        "elf_class": elf_class, "machine": machine, "long_mode": long_mode, "runs": runs, "alias": alias,
        "notes": notes, "ehsize": ehsize, "phentsize": phentsize, "shentsize": shentsize,
        "phdr_num": phdr_num, "have_section": have_section, "note_offset": note_offset,
        "memory_offset": memory_offset, "ram_bytes": total, "file_size": memory_offset + total,
    }


def _headers(lay: dict) -> bytes:
    c64 = lay["elf_class"] == 64
    phnum = min(lay["phdr_num"], PN_XNUM)
    shoff = lay["ehsize"] + lay["phentsize"] * lay["phdr_num"] if lay["have_section"] else 0
    ident = b"\x7fELF" + bytes([2 if c64 else 1, 1, 1]) + bytes(9)
    shentsize = lay["shentsize"] if lay["have_section"] else 0
    shnum = 1 if lay["have_section"] else 0
    if c64:
        out = bytearray(struct.pack("<16sHHIQQQIHHHHHH", ident, ET_CORE, lay["machine"], 1, 0,
                                    lay["ehsize"], shoff, 0, lay["ehsize"], lay["phentsize"],
                                    phnum, shentsize, shnum, 0))
        phdr = struct.Struct("<IIQQQQQQ")
        out += phdr.pack(PT_NOTE, 0, lay["note_offset"], 0, 0, len(lay["notes"]), len(lay["notes"]), 0)
        off = lay["memory_offset"]
        for gpa, size in lay["runs"]:
            out += phdr.pack(PT_LOAD, 0, off, 0, gpa, size, size, 0)
            off += size
        if lay["alias"]:  # the same frames again, at their C-bit address (see the module docstring)
            off = lay["memory_offset"]
            for gpa, size in lay["runs"]:
                out += phdr.pack(PT_LOAD, 0, off, 0, gpa | lay["alias"], size, size, 0)
                off += size
        if lay["have_section"]:
            out += struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, lay["phdr_num"] & _U32, 0, 0)
    else:
        out = bytearray(struct.pack("<16sHHIIIIIHHHHHH", ident, ET_CORE, lay["machine"], 1, 0,
                                    lay["ehsize"], shoff, 0, lay["ehsize"], lay["phentsize"],
                                    phnum, shentsize, shnum, 0))
        phdr = struct.Struct("<8I")
        out += phdr.pack(PT_NOTE, lay["note_offset"], 0, 0, len(lay["notes"]), len(lay["notes"]), 0, 0)
        off = lay["memory_offset"]
        for gpa, size in lay["runs"]:
            out += phdr.pack(PT_LOAD, off & _U32, 0, gpa & _U32, size & _U32, size & _U32, 0, 0)
            off += size
        if lay["have_section"]:
            out += struct.pack("<10I", 0, 0, 0, 0, 0, 0, 0, lay["phdr_num"] & _U32, 0, 0)
    return bytes(out)


def write_core(
    fileobj: BinaryIO,
    cpus: Sequence[CpuState],
    ram_runs: Iterable[tuple[int, int]],
    read_run: Callable[[int, int], bytes],
    progress: Callable[[int, int], None] | None = None,
    *,
    begin: int | None = None,
    length: int | None = None,
    elf_class: int | None = None,
    guest_note: bytes = b"",
    extra_notes: bytes = b"",
    alias_bit: int = 0,
) -> int:
    """Stream a QEMU-layout ELF core of ``ram_runs`` to ``fileobj``; return bytes written.

    ``ram_runs`` are ``(gpa, size)`` runs of RAM (any order; touching runs are merged).
    ``read_run(gpa, n)`` must return exactly ``n`` plaintext bytes (it is called with
    ``n <= 1 MiB``, so the whole RAM is never held in memory); its exceptions propagate.
    ``progress(done, total)`` is called after every piece (RAM bytes). ``begin``/``length``
    restrict the dump to ``[begin, begin+length)`` like ``dump-guest-memory``'s filter
    (both or neither; ValueError with QEMU's text otherwise). ``elf_class`` (32/64)
    overrides QEMU's class rule (see the module docstring). ``guest_note`` (a whole note:
    :func:`vmcoreinfo_note`) follows the vCPU notes where QEMU puts the guest's; ``extra_notes`` (whole notes,
    sevmon's own) follow QEMU's in the PT_NOTE segment. ``alias_bit`` (an SEV guest's C-bit): every run is
    described again at its C-bit address, pointing at the same bytes (ELF64 only).
    """
    lay = dump_layout(cpus, ram_runs, begin=begin, length=length, elf_class=elf_class, guest_note=guest_note,
                      extra_notes=extra_notes, alias_bit=alias_bit)
    head = _headers(lay)
    assert len(head) == lay["note_offset"]
    fileobj.write(head)
    fileobj.write(lay["notes"])
    written = len(head) + len(lay["notes"])
    total, done = lay["ram_bytes"], 0
    if progress is not None:
        progress(0, total)
    for gpa, size in lay["runs"]:
        off = 0
        while off < size:
            n = min(CHUNK, size - off)
            data = read_run(gpa + off, n)
            if len(data) != n:
                raise ValueError(f"read_run({gpa + off:#x}, {n}) returned {len(data)} bytes")
            fileobj.write(data)
            off += n
            done += n
            written += n
            if progress is not None:
                progress(done, total)
    return written
