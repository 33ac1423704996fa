"""The truth for drgn tests: drgn on QEMU's own ``dump-guest-memory`` ELF, not on anything sevmon made.

QEMU 7.2 without ``-device vmcoreinfo`` writes no VMCOREINFO note, so ``drgn -c`` cannot open its dump; drgn's
custom target can: every PT_LOAD is a physical segment read from the file, and the VMCOREINFO text is the page of
RAM that starts with ``OSRELEASE=`` (the kernel keeps it page-aligned in a page of its own) and names
``swapper_pg_dir``.
"""

from __future__ import annotations

import json
import mmap
import runpy
import sys
from pathlib import Path

from elftools.elf.elffile import ELFFile

PAGE = 4096
#: the drgn script every kernel-tool test runs (``drgn SCRIPT OUT``): release, tasks, printk records as JSON
SCRIPT = str(Path(__file__).with_name("drgn_tasks_dmesg.py"))
VIEW = ("release", "tasks", "dmesg")


def qemu_dump_segments(path: Path) -> list[tuple[int, int, int]]:
    """(guest-physical address, file offset, size) of each PT_LOAD of QEMU's dump."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        return [(s["p_paddr"], s["p_offset"], s["p_filesz"]) for s in elf.iter_segments()
                if s["p_type"] == "PT_LOAD" and s["p_filesz"]]


def find_vmcoreinfo(data, segments) -> bytes:
    for _, off, size in segments:
        for p in range(off, off + size - PAGE + 1, PAGE):
            if data[p:p + 10] == b"OSRELEASE=":
                text = bytes(data[p:p + PAGE]).split(b"\0")[0]
                if b"SYMBOL(swapper_pg_dir)=" in text:
                    return text
    raise AssertionError("no VMCOREINFO page in QEMU's dump")


def program_on_qemu_dump(path: Path, vmlinux: Path):
    """A drgn Program over QEMU's dump (the file stays mapped as long as the Program lives)."""
    import drgn
    f = open(path, "rb")  # noqa: SIM115 (kept open by the mapping the reader closes over)
    data = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    segments = qemu_dump_segments(path)
    prog = drgn.Program(drgn.Platform(drgn.Architecture.X86_64,
                                      drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN))
    for gpa, off, size in segments:
        def read(address, count, offset, physical, _off=off):
            return data[_off + offset:_off + offset + count]
        prog.add_memory_segment(gpa, size, read, physical=True)
    prog.set_linux_kernel_custom(find_vmcoreinfo(data, segments), False)
    prog.load_debug_info([str(vmlinux)])
    prog.config["qemu_dump"] = (f, data)
    return prog


def run_script(prog, out: Path) -> dict:
    """:data:`SCRIPT` on an in-process Program, as drgn runs it (``prog`` in its globals, ``sys.argv``)."""
    argv = sys.argv
    sys.argv = [SCRIPT, str(out)]
    try:
        runpy.run_path(SCRIPT, init_globals={"prog": prog}, run_name="__main__")
    finally:
        sys.argv = argv
    return json.loads(out.read_text())


def truth_view(dump: Path, vmlinux: Path, out: Path) -> dict:
    """drgn's view (:data:`VIEW`) of QEMU's own dump, checked to be a real kernel's before anything is compared
    with it."""
    view = run_script(program_on_qemu_dump(dump, vmlinux), out)
    assert [2, "kthreadd"] in view["tasks"] and len(view["dmesg"]) > 100
    return {k: view[k] for k in VIEW}
