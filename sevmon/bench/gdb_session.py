"""``sevmon bench`` row: a scripted gdb session through the real stub, side by side.

The script is what gdb 13 sends for ``x/512gx PAGE`` (checked with ``set debug remote 1``):
512 ``m ADDR,8`` packets per page, here over up to 4 mapped guest pages whose frames are RAM.
The packets go over a UNIX socket to :class:`~sevmon.gdb.server.GdbServer`, framing and
machine thread included, once with sevmon's debug layer and once with a naive stub's memory:
each packet walks the page tables with one DBG_DECRYPT per level and decrypts its own bytes
with one more, keeping nothing between packets (a stub over QEMU's ``cpu_memory_rw_debug``
with SEV debug ops). Round trips and firmware calls are exact counts, the same as a stub that
decrypts only the 8-byte entry at each level; the naive stub here decrypts each table page
whole (the walker's interface), so its bytes and time are an upper bound for such a stub.
Times are one run each, compared only within the run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time

from sevmon.debug.access import DebugMemory
from sevmon.debug.refusal import cbit_mask
from sevmon.gdb.packets import frame
from sevmon.machine.runner import MachineRunner
from sevmon.memory.ram import PAGE_SHIFT, PAGE_SIZE
from sevmon.x86 import paging

PAGES = 4


class PerPacketMemory:
    """The naive stub's memory: every table read and every packet's bytes decrypted on its own."""

    def __init__(self, ops):
        self.ops = ops

    def read_frames(self, pfns, *, private: bool = True, fill: bool = True) -> dict[int, bytes]:
        return {p: self.ops.read_run(p << PAGE_SHIFT, PAGE_SIZE, True) for p in dict.fromkeys(pfns)
                if self.ops.ram.has(p)}

    def read(self, gpa: int, size: int, *, private: bool = True, fill: bool = True) -> bytes:
        return self.ops.read_run(gpa, size, private)

    def write(self, gpa: int, data: bytes, *, private: bool = True) -> None:
        self.ops.write(gpa, data, private)

    def invalidate(self) -> None:
        pass


def script_pages(machine, n: int = PAGES) -> list[int]:
    """Virtual addresses of up to ``n`` mapped 4 KiB pages whose frames are RAM (sparse cores hold few)."""
    cpu, mask = machine.cpus[0], cbit_mask(machine)
    mem = DebugMemory(machine.ram, machine.memory.ops)
    out = []
    for m in paging.walk(mem, cpu, mask):
        t = paging.translate(mem, cpu, m.va, mask)
        if t is not None and machine.ram.has(t[0] >> PAGE_SHIFT):
            out.append(m.va)
            if len(out) == n:
                break
    return out


def script(pages: list[int]) -> list[bytes]:
    return [b"m%x,8" % (va + off) for va in pages for off in range(0, PAGE_SIZE, 8)]


async def _replay(machine, packets: list[bytes], runs: int) -> list[float]:
    from sevmon.gdb.server import GdbServer

    tmp = tempfile.mkdtemp(prefix="sevmon-bench-gdb-")
    runner = MachineRunner(machine)
    server = GdbServer(runner, None)
    times = []
    try:
        path = os.path.join(tmp, "gdb.sock")
        quiet = logging.getLogger("sevmon.gdb")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # the bench's own stub: its "listening on" line is not the user's
        try:
            await server.start(f"unix:{path}")
        finally:
            quiet.setLevel(level)
        reader, writer = await asyncio.open_unix_connection(path)

        async def ask(p: bytes) -> bytes:
            writer.write(frame(p))
            await reader.readuntil(b"$")
            reply = await reader.readuntil(b"#")
            await reader.readexactly(2)
            writer.write(b"+")
            return reply[:-1]

        await ask(b"?")
        for _ in range(runs):
            t0 = time.perf_counter()
            for p in packets:
                await ask(p)
            times.append((time.perf_counter() - t0) * 1000)
        await ask(b"D")
        writer.close()
    finally:
        await server.close()
        runner.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    return times


def _measure(machine, memory, packets: list[bytes], runs: int) -> list[dict]:
    ops = machine.memory.ops
    saved, machine.memory = machine.memory, memory
    try:
        rows = []
        before = dict(ops.stats())
        times = asyncio.run(_replay(machine, packets, 1))
        for t in times + asyncio.run(_replay(machine, packets, runs - 1) if runs > 1 else _nothing()):
            after = dict(ops.stats())
            rows.append({k: after[k] - before[k] for k in ("round-trips", "firmware-calls", "bytes-decrypted")}
                        | {"wall-ms": round(t, 1)})
            before = after
        return rows
    finally:
        machine.memory = saved


async def _nothing() -> list[float]:
    return []


def gdb_session(machine) -> dict:
    """The bench row: cold and warm (paused: the cache stays) for sevmon, one run of the naive stub."""
    pages = script_pages(machine)
    packets = script(pages)
    if not packets:
        return {"skipped": "no mapped page of this guest is RAM"}
    ops = machine.memory.ops
    built = DebugMemory(machine.ram, ops)
    cold, warm = _measure(machine, built, packets, 2)
    naive = _measure(machine, PerPacketMemory(ops), packets, 1)[0]
    return {"script": f"x/512gx on {len(pages)} pages: {len(packets)} m packets of 8 bytes",
            "pages": len(pages), "packets": len(packets), "cold": cold, "warm": warm, "naive": naive,
            "naive/sevmon round trips (cold)": round(naive["round-trips"] / max(1, cold["round-trips"]), 1),
            "naive/sevmon time (cold)": round(naive["wall-ms"] / max(0.001, cold["wall-ms"]), 2)}
