"""Guest memory on the monitor: info mem/tlb/registers, gva2gpa, x, xp, memsave, pmemsave,
and sevmon's debug statistics. Everything reads through ``machine.memory`` (the debug
access layer); the walkers strip the C-bit (``me_mask``) from CR3 and every entry.
"""

from __future__ import annotations

import base64
import contextlib

from sevmon.debug.ops import DebugError
from sevmon.debug.refusal import cbit_mask, machine_refusal
from sevmon.errors import CommandError
from sevmon.hmp.memory_dump import _printc, memory_dump
from sevmon.hmp.table import OWN, QEMU, QEMU_READS_MEMORY
from sevmon.machine.kernel_root import check_address, walk_cpu
from sevmon.memory.ram import MemoryAccessError
from sevmon.outfile import OutputFileError, output_file
from sevmon.x86 import paging
from sevmon.x86.info_registers import info_registers
from sevmon.x86.translation import read_virtual

COPY_CHUNK = 1 << 20       # memsave/pmemsave stream this much per read (bounded memory)
MAX_PHYSICAL_READ = 1 << 20  # read-guest-physical: bytes per call (its reply, base64, stays under 1.4 MB)
U64 = (1 << 64) - 1


def virtual_reader(machine, cpu):
    """``read(va, n)`` through the vCPU's page tables (x, memsave, the gdb stub): the range translated to
    physical runs first, each run read private or shared as its leaves say (:mod:`sevmon.x86.translation`).
    A vCPU whose registers cannot be read walks the kernel's own tables (:func:`walk_cpu`; DebugError when none
    is known), where a user address is refused in one sentence."""
    mem, mask = machine.memory, cbit_mask(machine)
    walk = walk_cpu(machine, cpu)
    if walk is cpu:
        return lambda va, n: read_virtual(mem, cpu, va, n, mask)

    def read(va: int, n: int) -> bytes:
        check_address(machine, cpu, va)
        return read_virtual(mem, walk, va, n, mask)
    return read


@contextlib.contextmanager
def open_output(filename: str):
    """The output file of a command that writes guest memory (:mod:`sevmon.outfile`): written beside the target,
    mode 0600, renamed into place only if the block completes; its refusals as QMP errors."""
    try:
        with output_file(filename) as f:
            yield f
    except OutputFileError as e:
        raise CommandError(str(e)) from None
    except OSError:  # the last write-back failed (ENOSPC at close): QEMU's words for a failed write
        raise CommandError("An IO error has occurred") from None


def check_debug_allowed(machine) -> None:
    """The debug-refusal rule before any file is touched: a refused command must not create or replace one, and
    pmemsave over non-RAM (zeros, no decrypt) must not succeed where debugging is forbidden."""
    reason = machine_refusal(machine)
    if reason:
        raise CommandError(reason)


def memsave(machine, val: int, size: int, filename: str, cpu_index: int | None) -> None:
    idx = 0 if cpu_index is None else cpu_index
    if not 0 <= idx < len(machine.cpus):
        raise CommandError("Parameter 'cpu-index' expects a CPU number")
    if size < 0:
        raise CommandError(f"Invalid addr 0x{val & U64:016x}/size {size} specified")
    check_debug_allowed(machine)
    try:
        read = virtual_reader(machine, machine.cpus[idx])
        if size > 0:
            check_address(machine, machine.cpus[idx], val)
    except DebugError as e:
        raise CommandError(e.reason) from None
    addr, left = val & U64, size
    with open_output(filename) as f:
        while left > 0:
            n = min(left, COPY_CHUNK)
            try:
                data = read(addr, n)
            except DebugError as e:
                raise CommandError(e.reason) from None
            except MemoryAccessError:
                raise CommandError(f"Invalid addr 0x{val & U64:016x}/size {size} specified") from None
            _write(f, data)
            addr = (addr + n) & U64
            left -= n


def pmemsave(machine, val: int, size: int, filename: str) -> None:
    check_debug_allowed(machine)
    addr, left = val & U64, size
    with open_output(filename) as f:
        while left > 0:
            n = min(left, COPY_CHUNK, (1 << 64) - addr)
            try:
                data = machine.memory.read_zero_filled(addr, n)
            except DebugError as e:
                raise CommandError(e.reason) from None
            _write(f, data)
            addr = (addr + n) & U64
            left -= n


def read_guest_physical(machine, addr: int, size: int) -> dict:
    """``read-guest-physical``: guest-physical bytes for a client that reads the guest itself (``sevmon drgn``).

    Why a command of its own: ``xp`` prints hex text and ``pmemsave`` needs a file; a kernel debugger makes
    thousands of small reads. Each goes through the debug path as ``xp`` does (the refusal rule first, then
    ``DebugMemory``: DBG_DECRYPT, the page cache, counted in ``query-sev-debug-stats``). Attached, the command
    first syncs with QEMU (its vCPU is looked up, as every walking command does), so the page cache is used only
    while QEMU's guest is known to have stayed paused. ``running`` tells the client whether the guest ran
    when it was read: a client may keep what it read only while the guest is paused (and no event came).
    Memory that is not RAM is an error, never zeros (attached, device memory is QEMU's to read, as ``xp``'s)."""
    if not 1 <= size <= MAX_PHYSICAL_READ:
        raise CommandError(f"Parameter 'size' expects a number of bytes from 1 to {MAX_PHYSICAL_READ}")
    addr &= U64
    if addr + size > 1 << 64:
        raise CommandError(f"Invalid addr 0x{addr:016x}/size {size} specified")
    check_debug_allowed(machine)
    if len(machine.cpus):
        machine.cpus[0]  # attached: the sync (fresh run state, page cache dropped if the guest ran)
    try:
        data = machine.memory.read(addr, size)
    except DebugError as e:
        raise CommandError(e.reason) from None
    except MemoryAccessError as e:
        raise CommandError(f"Invalid addr 0x{addr:016x}/size {size} specified: 0x{e.gpa:x} is not RAM") from None
    return {"data": base64.b64encode(data).decode("ascii"), "running": bool(machine.running)}


def _write(f, data: bytes) -> None:
    try:
        f.write(data)
    except OSError:
        raise CommandError("An IO error has occurred") from None


def debug_stats(machine) -> dict:
    return machine.memory.stats()


def _unless_disassembly(args: dict) -> str:
    """``x``/``xp`` are sevmon's, but ``/i`` is QEMU's: sevmon has no disassembler."""
    return QEMU_READS_MEMORY if args.get("format") == "i" else OWN


def register(registry, hmp, info) -> None:
    @registry.register("memsave", attached=OWN)
    def qmp_memsave(ctx, val, size, filename, cpu_index=None):
        memsave(ctx.machine, val, size, filename, cpu_index)
        return {}

    @registry.register("pmemsave", attached=OWN)
    def qmp_pmemsave(ctx, val, size, filename):
        pmemsave(ctx.machine, val, size, filename)
        return {}

    registry.register("read-guest-physical", attached=OWN)(
        lambda ctx, addr, size: read_guest_physical(ctx.machine, addr, size))

    # On the machine thread, between commands: counters of a half-done command would not add up.
    registry.register("query-sev-debug-stats", attached=OWN)(lambda ctx: debug_stats(ctx.machine))

    def walk_lines(ctx, fn) -> None:
        # ctx.cpu first: it syncs; a vCPU whose registers cannot be read walks the kernel's own tables
        cpu, mem, mask = walk_cpu(ctx.machine, ctx.cpu), ctx.machine.memory, cbit_mask(ctx.machine)
        memo = getattr(mem, "memo", None)
        key = (fn.__name__, cpu.get("cr0"), cpu.get("cr3"), cpu.get("cr4"), cpu.get("efer"), mask)
        if memo is not None:
            if (text := memo.get(key)) is not None:
                ctx.print(text, end="")
                return
            # the guest ran since: its last walk's text stands if every table that walk read (read again now,
            # as a walk reads them, level by level) holds the same bytes
            last = mem.walks.get(fn.__name__)
            if last is not None and last[0] == key and paging.tables_unchanged(mem, last[1], last[2]):
                if mem.coherent():
                    memo[key] = last[3]
                ctx.print(last[3], end="")
                return
        parts = []
        pending: list[str] = []
        size = 0
        walked: list = []
        for block in fn(mem, cpu, mask, tables=walked):  # whole lines; printed in ~64 KiB pieces (the output limit)
            pending.append(block)
            size += len(block)
            if size >= 1 << 16:
                parts.append(chunk := "".join(pending))
                ctx.print(chunk, end="")
                pending, size = [], 0
        if pending:
            parts.append(chunk := "".join(pending))
            ctx.print(chunk, end="")
        if memo is not None and mem.coherent():
            memo[key] = text = "".join(parts)
            t = walked[0] if walked else None
            mem.walks[fn.__name__] = (key, t.requests if t else [], dict(t.frames) if t else {}, text)

    @info.command("mem", "", "", "show the active virtual memory mappings", attached=OWN)
    def info_mem(ctx):
        walk_lines(ctx, paging.info_mem_text)

    @info.command("tlb", "", "", "show virtual to physical memory mappings", attached=OWN)
    def info_tlb(ctx):
        walk_lines(ctx, paging.info_tlb_text)

    @info.command("registers", "cpustate_all:-a,vcpu:i?", "[-a|vcpu]",
                  "show the cpu registers (-a: show register info for all cpus; vcpu: specific vCPU to query; "
                  "show the current CPU's registers if no argument is specified)", attached=QEMU)
    def info_regs(ctx, cpustate_all=False, vcpu=None):
        cpus = ctx.machine.cpus
        if cpustate_all:
            chosen = cpus
        elif vcpu is not None:
            if not 0 <= vcpu < len(cpus):
                ctx.print(f"CPU#{vcpu} not available")
                return
            chosen = [cpus[vcpu]]
        else:
            chosen = [ctx.cpu]
        for cpu in chosen:
            if cpu.unavailable:  # never print made-up values
                ctx.print(f"CPU#{cpu.index}: registers not available: {cpu.unavailable}")
                continue
            ctx.print(info_registers(cpu), end="")

    @info.command("sev-debug", "", "", "show SEV debug-access statistics (round trips, cache)", attached=OWN)
    def info_sev_debug(ctx):
        for k, v in debug_stats(ctx.machine).items():
            ctx.print(f"{k}: {v}")

    @hmp.command("gva2gpa", "addr:l", "addr",
                 "print the guest physical address corresponding to a guest virtual address", attached=OWN)
    def hmp_gva2gpa(ctx, addr):
        check_address(ctx.machine, ctx.cpu, addr)
        walk = walk_cpu(ctx.machine, ctx.cpu)
        ctx.print(paging.gva2gpa_text(ctx.machine.memory, walk, addr & U64, cbit_mask(ctx.machine)))

    @hmp.command("x", "fmt:/,addr:l", "/fmt addr", "virtual memory dump starting at 'addr'", attached=_unless_disassembly)
    def hmp_x(ctx, count, format, size, addr):
        read = virtual_reader(ctx.machine, ctx.cpu)
        check_address(ctx.machine, ctx.cpu, addr)
        for line in memory_dump(read, addr, count, format, size, virtual=True, span=COPY_CHUNK):
            ctx.print(line, end="")

    @hmp.command("xp", "fmt:/,addr:l", "/fmt addr", "physical memory dump starting at 'addr'", attached=_unless_disassembly)
    def hmp_xp(ctx, count, format, size, addr):
        mem = ctx.machine.memory
        for line in memory_dump(lambda a, n: mem.read(a, n), addr, count, format, size, virtual=False,
                                span=COPY_CHUNK):
            ctx.print(line, end="")

    @hmp.command("memsave", "val:l,size:i,filename:s", "addr size file",
                 "save to disk virtual memory dump starting at 'addr' of size 'size'", attached=OWN)
    def hmp_memsave(ctx, val, size, filename):
        memsave(ctx.machine, val, size, filename, ctx.cpu_index)

    @hmp.command("pmemsave", "val:l,size:i,filename:s", "addr size file",
                 "save to disk physical memory dump starting at 'addr' of size 'size'", attached=OWN)
    def hmp_pmemsave(ctx, val, size, filename):
        pmemsave(ctx.machine, val, size, filename)

    @hmp.command("print|p", "fmt:/,val:l", "/fmt expr", "print expression value (use $reg for CPU register access)",
                 attached=OWN)  # sevmon evaluates $reg (QEMU knows no $rsp, $cr3)
    def hmp_print(ctx, count, format, size, val):
        v = val & U64
        signed = v - (1 << 64) if v >> 63 else v
        if format == "o":
            text = f"0{v:o}" if v else "0"
        elif format == "x":
            text = f"{v:#x}" if v else "0"
        elif format == "u":
            text = str(v)
        elif format == "c":
            text = _printc(v & 0xFF)
        else:
            text = str(signed)
        ctx.print(text)
