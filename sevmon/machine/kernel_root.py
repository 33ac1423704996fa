"""Which page tables a walk starts from: the vCPU's CR3, or, when the vCPU cannot be read, the guest kernel's own.

Why: an SEV-ES guest's registers are encrypted in its VMSA, and a raw RAM image opened without ``--cpu-state``
has none. Walking a stale or made-up CR3 would print wrong answers silently; instead every walker (``info mem``,
``info tlb``, ``x``, ``gva2gpa``, ``memsave``, the C-bit map, the gdb stub's memory) asks :func:`walk_cpu` for the
vCPU to walk with, and gets either the real one or one whose CR3 is the Linux kernel's ``init_top_pgt``, found
through the debug path (:mod:`sevmon.x86.vmcoreinfo`). That root maps the kernel half only: a user address would
need a process's CR3, and :func:`check_address` says so. No Linux found: one sentence, the tables are unknown.
"""

from __future__ import annotations

from sevmon.debug.ops import DebugError
from sevmon.debug.refusal import cbit_mask
from sevmon.sev.abi import Policy
from sevmon.x86.cpu import CpuState
from sevmon.x86.vmcoreinfo import GuestKernel, KernelCache

U64 = (1 << 64) - 1


class PageTablesUnknown(DebugError):
    """No vCPU state and no Linux kernel found: nothing to walk from."""


class UserAddress(DebugError):
    """A user address asked of a walk that only knows the kernel's tables."""


def registers_unavailable(machine, cpu: CpuState) -> str | None:
    """Why ``cpu``'s registers cannot be used for a walk (a phrase), or None when they can."""
    why = getattr(cpu, "unavailable", None)
    if why:
        return why
    sev = machine.sev
    if sev is not None and sev.policy & Policy.ES:
        return "the SEV-ES guest's registers are encrypted in its VMSA"
    return None


def kernel_cache(machine) -> KernelCache:
    """The machine's :class:`KernelCache` (every machine holds one; it forgets on reset)."""
    cache = getattr(machine, "kernel_cache", None)
    if cache is None:
        cache = machine.kernel_cache = KernelCache()
    return cache


def guest_kernel(machine) -> GuestKernel | None:
    """The Linux kernel in the guest's RAM (cached while it is the same), or None; DebugError if debug is refused."""
    return kernel_cache(machine).get(machine.memory, machine.ram_runs())


def walk_cpu(machine, cpu: CpuState) -> CpuState:
    """The vCPU a walk starts from: ``cpu`` itself, or the kernel's root when ``cpu`` cannot be read."""
    why = registers_unavailable(machine, cpu)
    if why is None:
        return cpu
    kernel = guest_kernel(machine)
    if kernel is None:
        raise PageTablesUnknown(0, f"the guest's page tables are unknown: {why}, and no 64-bit Linux kernel "
                                   "(VMCOREINFO) was found in its memory")
    return kernel.walk_cpu(cbit_mask(machine), cpu.index)


def check_address(machine, cpu: CpuState, va: int) -> None:
    """UserAddress when ``va`` is a user address and only the kernel's tables are known (``cpu`` unreadable)."""
    why = registers_unavailable(machine, cpu)
    if why is not None and not (va & U64) >> 63:
        raise UserAddress(va, f"0x{va & U64:x} is a user address: it needs a process's page tables (CR3), and only "
                              f"the kernel's are known ({why})")
