"""Open real guest memory: QEMU ``dump-guest-memory`` ELF cores and raw RAM images.

* :func:`load_core` reads an ELF core (ELFCLASS32 or 64, little-endian, ET_CORE,
  EM_X86_64 or EM_386) with pyelftools. Every PT_LOAD with ``p_filesz > 0`` puts its file
  bytes at guest-physical ``p_paddr``; only those pages exist in the sparse
  :class:`~sevmon.memory.ram.RAM` (a page only partly covered at a segment edge exists,
  zero-filled around the covered bytes; the ``p_memsz - p_filesz`` tail is *not*
  created: QEMU writes it only when the memory was filtered out of the dump). Registers
  come from QEMU's notes: one ``NT_PRSTATUS`` per vCPU (x86_64 or i386 layout,
  ``pr_pid`` = index + 1) and one "QEMU" note per vCPU (``QEMUCPUState``: segments with
  limits/flags, GDT/IDT, CR0..CR4, kernel_gs_base), which wins where both say something.
  Register names: see :mod:`sevmon.machine.dump`.
* EFER is in neither note. ``cpu.json`` supplies it (:func:`apply_cpu_json`). Without it
  the loader sets ``EFER = LMA|LME`` (0x500) on a vCPU when the core's machine is
  EM_X86_64 and the vCPU has CR0.PG and CR4.PAE, and leaves EFER 0 otherwise. The
  machine, not the ELF class, is QEMU's long-mode signal: QEMU writes ELF64/EM_386 for
  32-bit PC guests (BIOS ROM below 4 GiB), e.g. the PAE fixture, which must not get LMA.
  NXE cannot be inferred and stays 0 -- load cpu.json for a faithful EFER.
* :func:`load_raw` reads a raw RAM image (``pmemsave`` of all RAM): gpa 0 at offset 0,
  every page stored (zero pages included), a short last page zero-padded (RAM is whole
  pages: an SEV launch encrypts it page by page).

Every failure is an :class:`ImageError` whose message is one sentence starting with the
path, e.g. ``core.elf: not an ELF file``.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass, field

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from sevmon.machine.dump import parse_prstatus, parse_qemu_cpustate
from sevmon.memory.ram import PAGE_SHIFT, PAGE_SIZE, RAM
from sevmon.x86.cpu import CR0_PG, CR4_PAE, EFER_LMA, EFER_LME, KNOWN_REGISTERS, CpuState, canonical_reg

__all__ = ["ImageError", "LoadedImage", "load_core", "load_raw", "load_image", "apply_cpu_json"]

_COPY = 1 << 20


class ImageError(Exception):
    """A guest image or cpu.json could not be used; ``str()`` is the user-facing sentence."""


@dataclass
class LoadedImage:
    """A loaded guest: its RAM (bytes at rest), vCPUs (at least one) and what it was.

    ``ram_size`` is ``ram.size``: for a core, the highest end (``p_paddr + p_memsz``) of
    any PT_LOAD rounded up to a page -- a sparse core (like the fixtures) reports less than
    the guest's configured RAM; for a raw image, the file size (or the ``ram_size`` given)
    rounded up to a page.
    """

    ram: RAM
    cpus: list[CpuState] = field(default_factory=list)
    ram_size: int = 0
    kind: str = "raw"  # 'elf64' | 'elf32' | 'raw'
    machine: str = ""  # 'EM_X86_64' | 'EM_386' for cores
    path: str = ""
    #: C-bit position from sevmon's SEVMON note (a dump of an SEV guest), already stripped from the tables
    stripped_cbitpos: int | None = None
    #: False for a core without vCPU notes (sevmon's dump of an SEV-ES guest): its registers are unknown, not zero
    cpu_notes: bool = True


# -- helpers --------------------------------------------------------------------------
def _os_error(path: str, e: OSError) -> ImageError:
    if isinstance(e, FileNotFoundError):
        return ImageError(f"{path}: no such file")
    if isinstance(e, IsADirectoryError):
        return ImageError(f"{path}: is a directory")
    if isinstance(e, PermissionError):
        return ImageError(f"{path}: permission denied")
    return ImageError(f"{path}: cannot open: {(e.strerror or str(e)).lower()}")


def _open(path: str):
    try:
        f = open(path, "rb")  # noqa: SIM115
    except OSError as e:
        raise _os_error(path, e) from None
    if not os.path.isfile(path):
        f.close()
        raise ImageError(f"{path}: not a regular file")
    return f


def _round_up(v: int, a: int = PAGE_SIZE) -> int:
    return -(-v // a) * a


def _copy_to_ram(ram: RAM, buf, gpa: int) -> None:
    """Copy the buffer ``buf`` (a memoryview) to guest-physical ``gpa``, page by page."""
    n = len(buf)
    pos = 0
    # Leading partial page.
    head = (-gpa) % PAGE_SIZE
    if head and n:
        k = min(head, n)
        ram.write(gpa, bytes(buf[:k]))
        pos = k
    pfn = (gpa + pos) >> PAGE_SHIFT
    while n - pos >= PAGE_SIZE:
        ram.set_frame(pfn, buf[pos:pos + PAGE_SIZE])
        pos += PAGE_SIZE
        pfn += 1
    if pos < n:
        ram.write(gpa + pos, bytes(buf[pos:]))


# -- ELF cores ------------------------------------------------------------------------
def load_core(path: str) -> LoadedImage:
    """Load a QEMU ``dump-guest-memory`` ELF core (see the module docstring)."""
    path = os.fspath(path)
    with _open(path) as f:
        ident = f.read(16)
        if len(ident) < 16 or ident[:4] != b"\x7fELF":
            raise ImageError(f"{path}: not an ELF file")
        if ident[4] not in (1, 2):
            raise ImageError(f"{path}: unknown ELF class {ident[4]}")
        if ident[5] != 1:
            raise ImageError(f"{path}: not a little-endian ELF file (only x86 cores are supported)")
        f.seek(0)
        size = os.fstat(f.fileno()).st_size
        if size < (64 if ident[4] == 2 else 52):
            raise ImageError(f"{path}: truncated ELF core (the ELF header is incomplete)")
        try:
            elf = ELFFile(f)
            etype = elf.header["e_type"]
            machine = elf.header["e_machine"]
            ph_end = elf.header["e_phoff"] + elf.num_segments() * elf.header["e_phentsize"]
            if ph_end > size:
                raise ImageError(f"{path}: truncated ELF core (the program headers end past the end of the file)")
            if etype != "ET_CORE":
                raise ImageError(f"{path}: not an ELF core dump (type {etype})")
            if machine not in ("EM_X86_64", "EM_386"):
                raise ImageError(f"{path}: not an x86 core dump (machine {machine})")
            segs = []
            notes = []
            for s in elf.iter_segments():
                segs.append(s.header)
                if s.header["p_type"] != "PT_NOTE" or s.header["p_filesz"] == 0:
                    continue
                if s.header["p_offset"] + s.header["p_filesz"] > size:
                    raise ImageError(f"{path}: truncated ELF core (the notes end past the end of the file)")
                for n in s.iter_notes():
                    desc_off = n["n_offset"] + 12 + _round_up(n["n_namesz"], 4)
                    notes.append((n["n_name"], n["n_type"], desc_off, n["n_descsz"]))
        except ImageError:
            raise
        except (ELFError, struct.error, ValueError, KeyError, UnicodeDecodeError) as e:
            raise ImageError(f"{path}: malformed ELF core ({e})") from None
        except Exception as e:  # construct raises its own errors on short reads
            raise ImageError(f"{path}: malformed ELF core ({type(e).__name__}: {e})") from None

        loads = ram_loads([h for h in segs if h["p_type"] == "PT_LOAD"])
        for h in loads:
            if h["p_filesz"] and h["p_offset"] + h["p_filesz"] > size:
                raise ImageError(
                    f"{path}: truncated ELF core (the PT_LOAD for guest-physical {h['p_paddr']:#x} "
                    f"needs {h['p_offset'] + h['p_filesz']} bytes, the file has {size})")
        ram_end = max((h["p_paddr"] + max(h["p_memsz"], h["p_filesz"]) for h in loads), default=0)
        ram = RAM(_round_up(ram_end))

        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            mv = memoryview(mm)
            try:
                for h in loads:
                    off, n, gpa = h["p_offset"], h["p_filesz"], h["p_paddr"]
                    done = 0
                    while done < n:
                        k = min(_COPY, n - done)
                        with mv[off + done:off + done + k] as piece:
                            _copy_to_ram(ram, piece, gpa + done)
                        done += k
                cpus = _cpus_from_notes(path, mm, notes)
            finally:
                mv.release()

    cpu_notes = bool(cpus)
    if not cpus:
        cpus = [CpuState(index=0)]
    if machine == "EM_X86_64":
        for cpu in cpus:
            if "efer" not in cpu.regs and cpu.cr0 & CR0_PG and cpu.cr4 & CR4_PAE:
                cpu.set("efer", EFER_LMA | EFER_LME)
    kind = "elf64" if elf.elfclass == 64 else "elf32"
    image = LoadedImage(ram=ram, cpus=cpus, ram_size=ram.size, kind=kind, machine=machine, path=path,
                        cpu_notes=cpu_notes)
    _strip_sevmon_cbit(image, notes)
    return image


def ram_loads(loads: list) -> list:
    """The PT_LOAD headers (dicts of ``p_paddr``, ``p_offset``, ``p_filesz``...) that are RAM: one that describes
    the same file bytes as another at a higher address is an alias of it (sevmon's dump of an SEV guest describes
    each run again at its C-bit address), not more RAM."""
    lowest: dict[tuple[int, int], int] = {}
    for h in loads:
        if h["p_filesz"]:
            key = (h["p_offset"], h["p_filesz"])
            lowest[key] = min(lowest.get(key, h["p_paddr"]), h["p_paddr"])
    return [h for h in loads if not h["p_filesz"] or lowest[(h["p_offset"], h["p_filesz"])] == h["p_paddr"]]


def _strip_sevmon_cbit(image: LoadedImage, notes) -> None:
    """A dump sevmon wrote of an SEV guest names its C-bit: strip it (see :mod:`.cbit_note`)."""
    from sevmon.machine.cbit_note import NOTE_NAME, NT_SEVMON_CBIT, parse_cbit_note
    from sevmon.machine.sevify import clear_cbit

    for name, ntype, off, dsz in notes:
        if name != NOTE_NAME or ntype != NT_SEVMON_CBIT:
            continue
        with open(image.path, "rb") as f:
            f.seek(off)
            desc = f.read(dsz)
        try:
            cbitpos = parse_cbit_note(desc)
        except ValueError as e:
            raise ImageError(f"{image.path}: unreadable {NOTE_NAME} note ({e})") from None
        roots = image.cpus if image.cpu_notes else [kernel_root_cpu(image.ram)]  # SEV-ES: no registers
        for cpu in roots:
            if cpu is not None:
                clear_cbit(image.ram, cpu, cbitpos)
        image.stripped_cbitpos = cbitpos
        return


def kernel_root_cpu(ram: RAM) -> CpuState | None:
    """For an image without registers: a vCPU at the Linux kernel's own root, found in the plaintext by its
    VMCOREINFO as it is found through DBG_DECRYPT; None when no Linux is found."""
    from sevmon.debug.access import DebugMemory
    from sevmon.debug.ops import PlainOps
    from sevmon.x86.vmcoreinfo import find

    kernel = find(DebugMemory(ram, PlainOps(ram), cache_pages=0), ram.runs())
    return kernel.walk_cpu() if kernel is not None else None


def _cpus_from_notes(path: str, mm, notes) -> list[CpuState]:
    prstatus: list[tuple[int, dict[str, int]]] = []
    qemu: list[dict[str, int]] = []
    try:
        for name, ntype, off, dsz in notes:
            desc = bytes(mm[off:off + dsz])
            if len(desc) != dsz:
                raise ValueError("a note runs past the end of the file")
            if name == "CORE" and ntype in ("NT_PRSTATUS", 1):
                prstatus.append(parse_prstatus(desc))
            elif name == "QEMU":
                qemu.append(parse_qemu_cpustate(desc))
    except ValueError as e:
        raise ImageError(f"{path}: unreadable register notes ({e})") from None
    cpus: list[CpuState] = []
    for i in range(max(len(prstatus), len(qemu))):
        index = prstatus[i][0] - 1 if i < len(prstatus) and prstatus[i][0] > 0 else i
        cpu = CpuState(index=index)
        if i < len(prstatus):
            cpu.update(prstatus[i][1])
        if i < len(qemu):
            cpu.update(qemu[i])
        cpus.append(cpu)
    return cpus


# -- raw images -----------------------------------------------------------------------
def load_raw(path: str, ram_size: int | None = None) -> LoadedImage:
    """Load a raw RAM image: guest-physical 0 at file offset 0, every page stored.

    ``ram_size`` (default: the file size) caps what is loaded and is the RAM size
    reported; pages past the end of the file do not exist.
    """
    path = os.fspath(path)
    if ram_size is not None and ram_size < 0:
        raise ImageError(f"{path}: RAM size must not be negative")
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ImageError(f"{path}: the file is empty")
        want = size if ram_size is None else min(size, ram_size)
        ram = RAM(_round_up(size if ram_size is None else ram_size))
        buf = bytearray(_COPY)
        mv = memoryview(buf)
        gpa = 0
        try:
            while gpa < want:
                k = f.readinto(mv[:min(_COPY, want - gpa)])
                if not k:
                    break
                full = k - k % PAGE_SIZE
                pfn = gpa >> PAGE_SHIFT
                for o in range(0, full, PAGE_SIZE):
                    ram.set_frame(pfn, mv[o:o + PAGE_SIZE])
                    pfn += 1
                if full < k:  # short last page: zero-padded
                    ram.write(gpa + full, bytes(mv[full:k]))
                gpa += k
        except OSError as e:
            raise ImageError(f"{path}: read error: {(e.strerror or str(e)).lower()}") from None
        finally:
            mv.release()
    return LoadedImage(ram=ram, cpus=[CpuState(index=0)], ram_size=ram.size, kind="raw", path=path)


def load_image(path: str, ram_size: int | None = None) -> LoadedImage:
    """An ELF core if the file starts with the ELF magic, otherwise a raw image."""
    path = os.fspath(path)
    with _open(path) as f:
        magic = f.read(4)
    return load_core(path) if magic == b"\x7fELF" else load_raw(path, ram_size)


# -- cpu.json -------------------------------------------------------------------------
def apply_cpu_json(image: LoadedImage, path: str) -> CpuState:
    """Merge a ``cpu.json`` (``{"cr3": "0x29da000", "rfl": "0x246", ...}``: hex strings
    or integers, QEMU ``info registers`` names) into vCPU 0; return that vCPU."""
    path = os.fspath(path)
    with _open(path) as f:
        raw = f.read()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ImageError(f"{path}: not a UTF-8 text file") from None
    except json.JSONDecodeError as e:
        raise ImageError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(data, dict):
        raise ImageError(f"{path}: expected a JSON object of register names to values")
    values: dict[str, int] = {}
    unknown = [k for k in data if canonical_reg(k) not in KNOWN_REGISTERS]
    if unknown:  # a typo (cr_3) would otherwise be read as nothing, and CR3 as 0
        raise ImageError(f"{path}: unknown register {unknown[0]!r}: expected QEMU's info registers names "
                         "(rax..r15, rip, rflags, cr0, cr2, cr3, cr4, efer, cs, cs_base...)")
    for k, v in data.items():
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise ImageError(f"{path}: register {k!r} must be a hex string or an integer")
        if isinstance(v, str):
            try:
                v = int(v.strip(), 0)
            except ValueError:
                raise ImageError(f"{path}: register {k!r} has a value that is not a number: {v!r}") from None
        if v < 0:
            raise ImageError(f"{path}: register {k!r} must not be negative")
        values[k] = v
    if not image.cpus:
        image.cpus.append(CpuState(index=0))
    image.cpus[0].update(values)
    return image.cpus[0]

