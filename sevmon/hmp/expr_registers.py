"""``$reg`` names for HMP expressions: QEMU's x86 ``monitor_defs`` plus sevmon's extras.

QEMU's table (``sevmon.hmp.expr.monitor_reg_lookup``) has eax.. edi, r8..r15, eflags,
eip, the segments and pc, but no 64-bit names and no control registers. sevmon also
accepts rax.. rsp, rip, rflags and cr0, cr2, cr3, cr4, efer, because walking a guest's
tables by hand starts from ``$cr3``. Unknown names give QEMU's "unknown register".
"""

from __future__ import annotations

from sevmon.hmp.expr import monitor_reg_lookup

_QEMU_NAMES = ("eax", "ecx", "edx", "ebx", "esp", "sp", "ebp", "fp", "esi", "edi", "eflags", "eip", "pc",
               *(f"r{i}" for i in range(8, 16)),
               *(f"{s}{f}" for s in ("cs", "ds", "es", "ss", "fs", "gs") for f in ("", ".base", ".limit")))
_EXTRA = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "rip", "rflags", "cr0", "cr2", "cr3", "cr4", "efer")

REGISTER_NAMES = sorted({*_QEMU_NAMES, *_EXTRA})


def register_lookup(cpu):
    """``get_reg(name) -> int | None`` for ``parse_expr``, over ``cpu``."""
    qemu = monitor_reg_lookup(cpu)

    def get_reg(name: str) -> int | None:
        v = qemu(name)
        if v is None and cpu is not None and name in _EXTRA:
            v = cpu.get(name)
        return v

    return get_reg
