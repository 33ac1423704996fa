"""The machine interface: run-state rules, and the built-in guest's layout and vCPU in every paging mode."""

from __future__ import annotations

import pytest

from sevmon.commands.registry import build
from sevmon.machine.builder import build_machine
from sevmon.machine.interface import Machine, RunState, StateError
from sevmon.machine.runner import MachineRunner
from sevmon.machine.spec import GuestSpec
from sevmon.x86 import paging
from sevmon.x86.modes import MODES


def test_a_local_machine_is_a_machine_and_refuses_transitions_qemu_would_not_make():
    m = build_machine(GuestSpec(memory_mib=64, workload=False, prelaunch=True))
    assert isinstance(m, Machine) and m.state is RunState.PRELAUNCH
    with pytest.raises(StateError, match="'prelaunch' -> 'postmigrate'"):
        m.transition(RunState.POSTMIGRATE)
    events = []
    m.add_listener(lambda name, data: events.append(name))
    m.cont()
    assert m.state is RunState.RUNNING and m.sev.state_name == "running" and events == ["RESUME"]
    m.stop()
    m.stop()  # no transition, no second event
    assert m.state is RunState.PAUSED and events == ["RESUME", "STOP"]


@pytest.mark.parametrize("paging_mode", ["4level", "5level", "pae", "32pse"])
def test_builtin_guest_layout_in_every_mode(paging_mode):
    """The kernel text, the user pages and (on SEV) the shared bounce-buffer page are where the layout says,
    and the vCPU is what a Linux in that mode has, so info registers and the walkers agree."""
    from sevmon.machine.builtin_guest import LAYOUTS

    m = build_machine(GuestSpec(paging=paging_mode, memory_mib=64, workload=False))
    cpu, mode, lay = m.cpus[0], MODES[paging_mode], LAYOUTS[paging_mode]
    assert cpu.paging_mode() == paging_mode.removesuffix("pse") and cpu.long_mode == mode.long_mode
    me = m.sev.me_mask
    maps = {mp.va: mp for mp in paging.walk(m.memory, cpu, me)}
    assert lay.kernel in maps and maps[lay.kernel].size == 1 << mode.levels[-2].shift
    assert lay.user in maps and lay.shared in maps and 0 not in maps
    shared = maps[lay.shared]
    assert shared.private is not mode.wide  # 4-byte entries have no C-bit to clear
    gpa, private = paging.translate(m.memory, cpu, lay.shared, me)
    assert m.memory.read(gpa, 34, private=private) == b"shared (unencrypted) bounce buffer"
    text = build(MachineRunner(m))[1].run("info registers")
    assert ("CS64" in text and "RIP=" in text) if mode.long_mode else ("CS32" in text and "EIP=" in text)
    assert f"{cpu.get('rip'):x}" in text.lower()
