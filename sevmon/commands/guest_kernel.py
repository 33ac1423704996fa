"""The guest's Linux kernel, as its VMCOREINFO describes it: HMP ``info guest-kernel``, QMP ``query-guest-kernel``.

Why: when the vCPU's registers cannot be read (SEV-ES, a raw image without ``--cpu-state``) the walkers start from
the kernel's own root table (:mod:`sevmon.machine.kernel_root`); this command shows what that root came from, what
finding it cost, and the VMCOREINFO text itself (what ``crash`` and ``drgn`` need), read through the debug path.
"""

from __future__ import annotations

from sevmon.debug.ops import DebugError
from sevmon.errors import CommandError
from sevmon.hmp.table import OWN
from sevmon.machine.kernel_root import guest_kernel, kernel_cache

NOT_FOUND = "no 64-bit Linux kernel was found in guest memory (no page starts with a usable VMCOREINFO text)"


def query(machine) -> dict:
    """``query-guest-kernel``'s answer; CommandError (one sentence) when debug is refused or no Linux is found."""
    try:
        kernel = guest_kernel(machine)
    except DebugError as e:
        raise CommandError(e.reason) from None
    if kernel is None:
        raise CommandError(NOT_FOUND)
    cost = kernel_cache(machine).last_cost
    return {**kernel.to_qmp(), "scanned-pages": cost.pages if cost else 0,
            "scan-requests": cost.requests if cost else 0}


def register(registry, hmp, info) -> None:
    registry.register("query-guest-kernel", attached=OWN)(lambda ctx: query(ctx.machine))

    @info.command("guest-kernel", "", "", "show the guest's Linux kernel as its VMCOREINFO describes it "
                                          "(release, KASLR offset, page-table root)", attached=OWN)
    def info_guest_kernel(ctx):
        q = query(ctx.machine)
        ctx.print(f"release: {q['release']}")
        ctx.print(f"kaslr offset: 0x{q['kaslr-offset']:x}")
        ctx.print(f"phys_base: 0x{q['phys-base']:x}")
        ctx.print(f"page table root: 0x{q['root']:x} (init_top_pgt, {q['paging-levels']}-level paging)")
        ctx.print(f"vmcoreinfo: 0x{q['vmcoreinfo-gpa']:x} ({len(q['vmcoreinfo'])} bytes; found after "
                  f"{q['scanned-pages']} pages in {q['scan-requests']} requests)")
        ctx.print(q["vmcoreinfo"], end="" if q["vmcoreinfo"].endswith("\n") else "\n")
