"""The translation layer (sevmon.x86.translation): virtual ranges to physical runs, under x, memsave and gdb."""

from __future__ import annotations

import pytest

from sevmon.commands.registry import build
from sevmon.debug.refusal import cbit_mask
from sevmon.machine.builder import build_machine
from sevmon.machine.runner import MachineRunner
from sevmon.machine.spec import GuestSpec
from sevmon.memory.ram import MemoryAccessError
from sevmon.x86.translation import Run, physical_runs, read_virtual, write_virtual

KERNEL = 0xFFFFFFFF81000000  # the built-in guest's kernel text: virtually and physically contiguous


@pytest.fixture(scope="module")
def guest():
    runner = MachineRunner(build_machine(GuestSpec(memory_mib=64, workload=False)))
    registry, monitor = build(runner)
    assert monitor.run("stop") == ""
    yield runner.machine, monitor
    runner.shutdown()


def _round_trips(monitor) -> int:
    line = next(ln for ln in monitor.run("info sev-debug").splitlines() if ln.startswith("round-trips: "))
    return int(line.split()[1])


def test_x_over_a_contiguous_range_is_one_round_trip(guest):
    machine, monitor = guest
    base = KERNEL + 0x10000
    # the tables are read (and cached) by gva2gpa; the two data pages are not read yet
    assert monitor.run(f"gva2gpa {base:#x}") == "gpa: 0x1010000\n"
    assert monitor.run(f"gva2gpa {base + 0x1000:#x}") == "gpa: 0x1011000\n"
    before = _round_trips(monitor)
    out = monitor.run(f"x /1024gx {base:#x}")  # 8 KiB: two pages, one physical run
    assert out.count("\n") == 512 and out.startswith(f"{base:016x}: ")
    assert _round_trips(monitor) - before == 1


def test_runs_merge_contiguous_pages_and_split_elsewhere(guest):
    machine, _ = guest
    mem, cpu, mask = machine.memory, machine.cpus[0], cbit_mask(machine)
    runs = physical_runs(mem, cpu, KERNEL + 0x800, 0x2000, mask)
    assert runs == [Run(KERNEL + 0x800, 0x1000800, 0x2000, True)]
    # the kernel's frames seen through the direct map too: the same bytes, one run each way
    direct = physical_runs(mem, cpu, 0xFFFF888001000800, 0x2000, mask)
    assert [(r.gpa, r.size) for r in direct] == [(0x1000800, 0x2000)]
    assert read_virtual(mem, cpu, KERNEL + 0x800, 0x2000, mask) == mem.read(0x1000800, 0x2000)
    with pytest.raises(MemoryAccessError) as e:
        physical_runs(mem, cpu, 0x420000 - 0x1000, 0x2000, mask)  # the second page is unmapped
    assert e.value.gpa == 0x420000  # the first unmapped page's address


def test_a_root_other_than_cr3(guest):
    machine, _ = guest
    mem, cpu, mask = machine.memory, machine.cpus[0], cbit_mask(machine)
    assert physical_runs(mem, cpu, KERNEL, 16, mask, root=cpu.cr3) == physical_runs(mem, cpu, KERNEL, 16, mask)
    with pytest.raises(MemoryAccessError):
        physical_runs(mem, cpu, KERNEL, 16, mask, root=0)  # an empty table at frame 0: nothing mapped


def test_a_write_that_would_fault_half_way_writes_nothing(guest):
    machine, _ = guest
    mem, cpu, mask = machine.memory, machine.cpus[0], cbit_mask(machine)
    va = 0x420000 - 8
    before = read_virtual(mem, cpu, va, 8, mask)
    with pytest.raises(MemoryAccessError):
        write_virtual(mem, cpu, va, b"\xaa" * 16, mask)
    assert read_virtual(mem, cpu, va, 8, mask) == before
    write_virtual(mem, cpu, va, b"\x55" * 8, mask)
    assert read_virtual(mem, cpu, va, 8, mask) == b"\x55" * 8
