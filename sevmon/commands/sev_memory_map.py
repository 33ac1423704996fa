"""The C-bit map on the monitor: HMP ``info sev-mem`` and ``sev-mem-map FILE``, QMP ``query-sev-memory-map``
and ``sev-mem-map``. Which pages are private (encrypted) and which shared, by range, by frame, and the frames
mapped both ways (aliases). Everything comes from ``machine.memory``, ``machine.cpus`` and the walker, so it costs
what ``info mem`` costs (nothing after a warm ``info tlb``) and works on any machine the walker reads.
"""

from __future__ import annotations

import itertools
import json

from sevmon.commands.memory import _write, open_output
from sevmon.debug.ops import DebugError
from sevmon.debug.refusal import cbit_mask
from sevmon.errors import CommandError
from sevmon.hmp.table import OWN
from sevmon.machine.kernel_root import walk_cpu
from sevmon.x86.sev_memory_map import PAGE, FrameCounts, SevMemoryMap, build_map, frames_text

NOT_SEV = "the guest is not an SEV guest: no page has a C-bit"
MAX_ALIAS_LINES = 4096      # info sev-mem lists at most this many alias runs, then says how many more
MAX_REPLY = 8 << 20         # a QMP reply is one line; qemu.qmp clients drop lines over 10 MiB


def memory_map(machine, cpu_index: int) -> SevMemoryMap:
    """The map for ``cpu_index``, or CommandError with one line (not SEV, bad vCPU, debug refused)."""
    if machine.sev is None:
        raise CommandError(NOT_SEV)
    if not 0 <= cpu_index < len(machine.cpus):
        raise CommandError("Parameter 'cpu-index' expects a CPU number")
    try:
        cpus = [walk_cpu(machine, c) for c in machine.cpus]  # the kernel's root where a vCPU cannot be read
        return build_map(machine.memory, cpus, cpu_index, cbit_mask(machine))
    except DebugError as e:
        raise CommandError(e.reason) from None


def ram_runs(machine) -> list[tuple[int, int]]:
    """The guest's RAM as ``(gpa, size)`` runs: all of a built-in guest's RAM, a core's or raw image's frames, an
    attached QEMU's RAM blocks."""
    return [(first * PAGE, count * PAGE) for first, count in machine.ram_runs()]


def hole_name(machine) -> str:
    """What a frame below the end of RAM that is not RAM is: in a core or a raw image, a frame the image lacks
    (a sparse dump leaves out what it did not save, RAM or not); elsewhere a device or the PCI hole."""
    return "not in the image" if getattr(machine.config, "source", None) in ("core", "raw") else "not RAM"


def address_space_top(machine, m: SevMemoryMap, ram: list[tuple[int, int]]) -> int:
    """Where the picture ends: the end of RAM (configured size or last frame); mappings beyond RAM are not
    drawn. A machine that reports no RAM is drawn up to its last mapped frame."""
    top = max([getattr(getattr(machine.memory, "ram", None), "size", 0) or 0] + [g + s for g, s in ram])
    if not top:
        top = max([g + s for g, s in m.private + m.shared] or [PAGE])
    return top


def _ranges(ranges) -> list[dict]:
    return [{"gpa": g, "size": s} for g, s in ranges]


def to_qmp(m: SevMemoryMap, ram: list[tuple[int, int]], counts: FrameCounts, physical: bool) -> dict:
    """``frames`` splits ``mapped-frames`` into the classes of ``info sev-mem``'s summary and the picture."""
    out = {
        "cpu-index": m.cpu_index, "paging": m.paging,
        "ranges": [{"start": r.start, "end": r.end, "size": r.size, "prot": r.prot_text,
                    "attribute": "private" if r.private else "shared"} for r in m.ranges],
        "private-bytes": m.bytes_of(True), "shared-bytes": m.bytes_of(False),
        "mapped-frames": m.mapped_frames, "aliased-frames": m.frames(m.aliased),
        "frames": {"private": counts.private, "shared": counts.shared, "aliased": counts.aliased,
                   "not-ram": counts.hole, "past-ram": counts.past},
        "aliases": [{"gpa": a.gpa, "size": a.size,
                     "private": [{"cpu-index": c, "va": va} for c, va in a.private],
                     "shared": [{"cpu-index": c, "va": va} for c, va in a.shared]} for a in m.aliases],
    }
    if physical:
        out["physical"] = {"ram": _ranges(ram), "private": _ranges(m.private), "shared": _ranges(m.shared),
                           "aliased": _ranges(m.aliased)}
    if len(json.dumps(out, separators=(",", ":"))) > MAX_REPLY:
        raise CommandError(f"The map has {len(m.ranges)} ranges: more than one QMP reply may carry "
                       f"({MAX_REPLY >> 20} MiB); use 'info sev-mem' or 'sev-mem-map'")
    return out


def text_lines(m: SevMemoryMap, counts: FrameCounts, hole: str = "not RAM"):
    """``info sev-mem``: info mem's ranges with the attribute, a summary line, the aliases and their count."""
    if not m.paging:
        yield "PG disabled"
        return
    for r in m.ranges:
        yield r.line()
    yield f"private: {m.bytes_of(True)} bytes, shared: {m.bytes_of(False)} bytes, {frames_text(m, counts, hole)}"
    for a in m.aliases[:MAX_ALIAS_LINES]:
        views = ", ".join([f"private cpu {c} {va:016x}" for c, va in a.private]
                          + [f"shared cpu {c} {va:016x}" for c, va in a.shared])
        yield f"aliased {a.gpa:016x}-{a.gpa + a.size - 1:016x}: {views}"
    if len(m.aliases) > MAX_ALIAS_LINES:
        yield f"... {len(m.aliases) - MAX_ALIAS_LINES} more aliased runs"
    n = m.frames(m.aliased)
    yield f"{n} aliased frame{'' if n == 1 else 's'}"


def save_svg(machine, filename: str) -> None:
    """Draw the map (every vCPU's frames) and write it; the file is created only once the picture is ready."""
    from sevmon.render.sev_memory_map_svg import render_svg  # noqa: PLC0415 (drawsvg loads only for pictures)

    m = memory_map(machine, 0)
    ram = ram_runs(machine)
    svg = render_svg(m, ram, address_space_top(machine, m, ram), hole=hole_name(machine))
    with open_output(filename) as f:
        _write(f, svg.encode())


def register(registry, hmp, info) -> None:
    @registry.register("query-sev-memory-map", attached=OWN)
    def qmp_query_sev_memory_map(ctx, cpu_index=None, physical=None):
        m = memory_map(ctx.machine, 0 if cpu_index is None else cpu_index)
        ram = ram_runs(ctx.machine)
        return to_qmp(m, ram, m.frame_counts(ram, address_space_top(ctx.machine, m, ram)), bool(physical))

    @registry.register("sev-mem-map", attached=OWN)
    def qmp_sev_mem_map(ctx, filename):
        save_svg(ctx.machine, filename)
        return {}

    @info.command("sev-mem", "", "", "show the active virtual memory mappings as private (C-bit set) or shared, "
                                     "and the frames mapped both ways", attached=OWN)
    def info_sev_mem(ctx):
        m = memory_map(ctx.machine, ctx.cpu_index)
        ram = ram_runs(ctx.machine)
        lines = text_lines(m, m.frame_counts(ram, address_space_top(ctx.machine, m, ram)), hole_name(ctx.machine))
        while batch := list(itertools.islice(lines, 8192)):
            ctx.print("\n".join(batch))

    @hmp.command("sev-mem-map", "filename:F", "filename",
                 "draw the guest-physical memory as private/shared/aliased into the SVG file 'filename'",
                 attached=OWN)
    def hmp_sev_mem_map(ctx, filename):
        save_svg(ctx.machine, filename)
