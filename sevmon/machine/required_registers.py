"""Which registers a raw RAM image's ``--cpu-state`` must supply.

A raw image carries no registers, and a missing one reads as 0: ``{}`` would silently mean
CR3 = 0 and an empty ``info mem``. So the registers the paging mode depends on must be
given: CR0 (is paging on?), with CR0.PG also CR3 (the root table) and CR4 (PAE, PSE, LA57),
and with CR4.PAE also EFER (LMA tells PAE from 4/5-level paging). A core's notes carry
CR0-CR4 themselves, so for ``--core`` cpu.json only fills gaps.
"""

from __future__ import annotations

from sevmon.x86.cpu import CR0_PG, CR4_PAE, CpuState


def missing_paging_registers(cpu: CpuState) -> list[str]:
    """The registers the vCPU's paging mode needs that ``cpu`` lacks (an unknown bit counts as set)."""
    have = cpu.regs
    need = ["cr0"]
    paging = "cr0" not in have or cpu.cr0 & CR0_PG
    if paging:
        need += ["cr3", "cr4"]
        if "cr4" not in have or cpu.cr4 & CR4_PAE:
            need.append("efer")
    return [r for r in need if r not in have]


def paging_registers_error(path: str, cpu: CpuState) -> str | None:
    """One sentence naming the missing registers, or None when the paging mode is fully given."""
    missing = missing_paging_registers(cpu)
    if not missing:
        return None
    return (f"{path}: lacks {', '.join(missing)}: a raw image needs cr0, with CR0.PG set also cr3 and cr4, "
            f"and with CR4.PAE set also efer (it tells PAE from 4- and 5-level paging)")
