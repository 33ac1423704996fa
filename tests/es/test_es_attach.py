"""Attached to a live SEV-ES QEMU (query-sev policy bit 2): QEMU's register dump is its stale reset state, so
sevmon never asks for it, never walks from it, and says so in ``info registers``. Driven through the simulated
QEMU process (an SEV-ES launch on the platform model, the mirror VM opened as on hardware), as the SEV attach is.
"""

from __future__ import annotations

import asyncio

import pytest

from sevmon.attach.commands import build_attached
from sevmon.attach.machine import AttachedMachine
from sevmon.debug.access import DebugMemory
from sevmon.debug.ops import SevOps
from sevmon.machine.runner import MachineRunner
from sevmon.memory.ram import RAM
from sevmon.model import SimulatedHost
from sevmon.model.sim_qemu import SimulatedQemu, attach_simulated
from sevmon.sev.vmsa import BSP_RESET_EIP, reset_vmsa
from sevmon.x86.cpu import RegistersUnavailable
from sevmon.x86.info_registers import info_registers
from sevmon.x86.translation import read_virtual

IMAGE = b"SEV-ES guest RAM" * 256
# what QEMU 7.2's info registers prints for an SEV-ES vCPU: its reset state, never synced from the VMSA
STALE = ("RAX=0000000000000000 RBX=0000000000000000 RCX=0000000000000000 RDX=0000000000800f12\n"
         "RIP=000000000000fff0 RFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0\n"
         "CR0=60000010 CR2=0000000000000000 CR3=0000000000000000 CR4=00000000\n")


class QemuLink:
    """QEMU's monitor as attach sees it, answering from the simulated QEMU; it records what it was asked."""

    def __init__(self, qemu: SimulatedQemu):
        self.qemu, self.asked, self.on_event, self.loop, self.proxied = qemu, [], None, None, False

    def call_sync(self, coro):
        return asyncio.new_event_loop().run_until_complete(coro)

    async def hmp(self, line: str, cpu_index: int = 0) -> str:
        self.asked.append(line)
        return STALE if line == "info registers" else ""

    async def execute(self, name: str, args: dict | None = None):
        self.asked.append(name)
        return {"status": "running", "running": True} if name == "query-status" else self.qemu.query_sev()

    def drain(self) -> None:
        pass


@pytest.fixture
def attached():
    host = SimulatedHost(min_asid=16, sev_es=True)
    qemu = SimulatedQemu(host, RAM(16 << 20), [(0x100000, IMAGE)], policy=0x4,
                         vmsas=[reset_vmsa(BSP_RESET_EIP, 0x800F12)] * 2)
    mirror = attach_simulated(qemu)
    link = QemuLink(qemu)
    machine = AttachedMachine(link, mirror.ram, DebugMemory(mirror.ram, SevOps(mirror.ram, mirror)), 2, "running",
                              sev=mirror, memory_encryption=True)
    yield machine, link
    mirror.close()
    qemu.exit()


def test_an_sev_es_qemu_is_seen_as_such_and_its_dump_never_asked(attached):
    machine, link = attached
    assert machine.registers_encrypted
    machine.begin_command()
    cpus = [machine.cpus[0], machine.cpus[1]]
    text = "".join(info_registers(c) for c in cpus)
    assert "encrypted in its VMSA" in text and "cached reset state" in text and "never uses it" in text
    assert "RIP=" not in text and "CR3=" not in text and "0800f12" not in text
    assert "info registers" not in link.asked          # QEMU's stale dump is never fetched
    with pytest.raises(RegistersUnavailable):
        read_virtual(machine.memory, cpus[0], 0xFFFFFFFF81000000, 8, machine.sev.me_mask)  # no CR3 walk
    # guest memory itself is read through the mirror's DBG_DECRYPT
    assert machine.memory.read(0x100000, 32) == IMAGE[:32]


def test_info_registers_and_print_are_sevmons_when_attached_to_sev_es(attached):
    """The HMP lines QEMU would answer from its stale dump are sevmon's for an SEV-ES guest."""
    machine, link = attached
    runner = MachineRunner(machine)
    _, monitor = build_attached(runner)
    out = monitor.run("info registers -a")
    assert out.count("CPU#") == 2 and out.count("cached reset state") == 2 and "RIP=" not in out
    out = monitor.run("print $rip")
    assert out.startswith("Error: ") and "encrypted in its VMSA" in out and "fff0" not in out
    assert monitor.run("print 2+3").strip() == "0x5"  # no register: answered as before
    out = monitor.run("x /2xg 0xffffffff81000000")
    assert out.startswith("Error: ") and "encrypted in its VMSA" in out
    assert "info registers" not in link.asked and not any(a.startswith("print") for a in link.asked)


def test_nothing_that_qemu_would_read_is_passed_to_it_for_an_sev_es_guest(attached):
    """QEMU would read an SEV-ES guest's memory with its stale reset registers and see ciphertext: x /i, xp /i,
    sum and migrate (HMP), migrate and snapshot-save (QMP) are refused, and QEMU is never asked."""
    machine, link = attached
    runner = MachineRunner(machine)
    registry, monitor = build_attached(runner)
    assert monitor.run("x /2i 0x100000") == "0x100000: unable to read memory\n"
    assert monitor.run("xp /2i 0x100000") == "0x100000: unable to read memory\n"
    for line in ("sum 0x100000 16", 'migrate "exec:cat > /dev/null"'):
        out = monitor.run(line)
        assert out.startswith("Error: the guest is an SEV-ES guest") and out.count("\n") == 1, (line, out)
    assert not any(a.split()[0] in ("x", "xp", "sum", "migrate") for a in link.asked), link.asked
    assert {"migrate", "snapshot-save"} <= registry.forwarder.reads_memory
