"""vCPU registers from QEMU's HMP ``info registers`` text (QMP has no control registers).

QEMU prints ``NAME=hex`` tokens (``RAX=..``, ``R8 =..``, ``CR3=..``, ``EFER=..``; ``EAX``,
``EIP``, ``EFL`` for a 32-bit vCPU), one line per segment (``CS =sel base limit flags``)
and ``GDT=     base limit``. The result is a :class:`~sevmon.x86.cpu.CpuState` under
the names the walkers, ``$reg`` expressions and core dumps use.
"""

from __future__ import annotations

import re

from sevmon.x86.cpu import CpuState

_SEG = re.compile(r"^(ES|CS|SS|DS|FS|GS|LDT|TR) ?=([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+) ([0-9a-f]+)")
_TABLE = re.compile(r"^(GDT|IDT)= +([0-9a-f]+) ([0-9a-f]+)")
_TOKEN = re.compile(r"\b([A-Z][A-Z0-9]*) ?=([0-9a-f]+)\b")
_SKIP = ("FPR", "YMM", "XMM", "ZMM", "FCW", "FSW", "FTW", "MXCSR", "PKRU", "BND", "ST")


def parse_info_registers(text: str, index: int = 0) -> CpuState:
    cpu = CpuState(index=index, halted=False)
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.startswith(_SKIP):  # FPU/vector lines (most of the text) carry only skipped names
            continue
        m = _SEG.match(line)
        if m:
            seg = m.group(1).lower()
            cpu.set(seg, int(m.group(2), 16))
            cpu.set(f"{seg}_base", int(m.group(3), 16))
            cpu.set(f"{seg}_limit", int(m.group(4), 16))
            cpu.set(f"{seg}_flags", int(m.group(5), 16))
            continue
        m = _TABLE.match(line)
        if m:
            t = m.group(1).lower()
            cpu.set(f"{t}_base", int(m.group(2), 16))
            cpu.set(f"{t}_limit", int(m.group(3), 16))
            continue
        for name, value in _TOKEN.findall(line):
            if name.startswith(_SKIP):
                continue
            if name == "HLT":
                cpu.halted = value == "1"
            cpu.set(name.lower(), int(value, 16))
    return cpu
