"""gdb's threads are the vCPUs, and ``thread N`` picks whose page tables translate addresses.

No shipped guest has two vCPUs, so this one test serves a built-in guest with a second vCPU
added (paging off: its virtual addresses are guest-physical) from a stub running in this
process, and drives it with the real gdb."""

from __future__ import annotations

import asyncio
import threading

from sevmon.commands.registry import build
from sevmon.debug.refusal import cbit_mask
from sevmon.gdb.server import GdbServer
from sevmon.machine.builder import build_machine
from sevmon.machine.runner import MachineRunner
from sevmon.machine.spec import GuestSpec
from sevmon.x86 import paging
from sevmon.x86.cpu import CpuState
from tests.gdb.gdb_support import need_gdb, run_gdb


def _builtin_machine():
    machine = build_machine(GuestSpec(workload=False))
    machine.cpus.append(CpuState(1, {"cr0": 0x11, "rip": 0xFFF0, "cs": 0xF000}))  # paging off
    return machine


def test_info_threads_lists_vcpus_and_thread_n_switches_translation(tmp_path):
    need_gdb()
    machine = _builtin_machine()
    runner = MachineRunner(machine)
    _, monitor = build(runner)
    gpa = paging.translate(machine.memory, machine.cpus[0], 0x400000, cbit_mask(machine))[0]
    path = str(tmp_path / "gdb.sock")
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box = {}

    async def serve():
        box["server"] = server = GdbServer(runner, monitor)
        await server.start(f"unix:{path}")
        started.set()

    t = threading.Thread(target=lambda: (loop.run_until_complete(serve()), loop.run_forever()), daemon=True)
    t.start()
    assert started.wait(20)
    try:
        out = run_gdb(path, "info threads", "x/2gx 0x400000", "thread 2", "p/x $pc", f"x/2gx {gpa:#x}",
                      "x/2gx 0x400000", "monitor gva2gpa 0x400000", "thread 1", "x/2gx 0x400000")
    finally:
        asyncio.run_coroutine_threadsafe(box["server"].close(), loop).result(20)
        loop.call_soon_threadsafe(loop.stop)
        t.join(20)
        runner.shutdown()
    assert "* 1    Thread 1 (CPU#0" in out and "  2    Thread 2 (CPU#1" in out
    user = "0x6761702072657375\t0x0000000000302065"           # "user page 0" through vCPU 0's tables
    assert out.count(f"0x400000:\t{user}") == 2                 # thread 1, before and after
    assert "[Switching to thread 2" in out and "$1 = 0xfff0" in out
    assert f"{gpa:#x}:\t{user}" in out                          # vCPU 1 has paging off: gva = gpa
    assert f"gpa: {0x400000:#x}" in out                         # monitor commands follow the thread too
