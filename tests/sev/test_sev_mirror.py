"""A live SEV guest owned by a simulated QEMU process, reached by sevmon through a mirror VM (MirrorSev), the same
code path as on hardware (SimProcessOps instead of LinuxProcessOps). The monitor's answers through the mirror equal
those of the guest's own VMM, cold round trips are at the level-batched bound, and NODBG gives no plaintext."""

from __future__ import annotations

import copy
import errno as E

import pytest

from sevmon.bench.readers import make_reader
from sevmon.commands.registry import build
from sevmon.debug.access import DebugMemory
from sevmon.debug.ops import SevOps
from sevmon.machine.builder import build_machine
from sevmon.machine.interface import MachineConfig
from sevmon.machine.local import LocalMachine
from sevmon.machine.runner import MachineRunner
from sevmon.machine.spec import GuestSpec, SevSpec
from sevmon.memory.ram import RAM
from sevmon.model import SimulatedHost
from sevmon.model.sim_qemu import SimulatedQemu, attach_simulated
from sevmon.sev import SevError
from sevmon.x86 import paging


def _qemu_and_mirror(policy: int = 0, workload: bool = False):
    """The built-in guest as QEMU would run it (its own process, a memfd backend), and sevmon's mirror of it."""
    q = build_machine(GuestSpec(memory_mib=64, workload=workload, sev=SevSpec(policy=policy)))
    qemu = SimulatedQemu.adopt(q.sev)
    return q, qemu, attach_simulated(qemu)


def _attached_view(q, mirror) -> LocalMachine:
    """What sevmon monitors once attached: QEMU's RAM and registers, memory through the mirror."""
    memory = DebugMemory(q.ram, SevOps(q.ram, mirror), cache_pages=16384)
    return LocalMachine(q.ram, copy.deepcopy(q.cpus), memory, config=MachineConfig(kvm_enabled=True), sev=mirror)


def test_the_monitor_through_the_mirror_equals_the_guests_own_vmm():
    q, qemu, mirror = _qemu_and_mirror()
    assert mirror.kernel.task.pid != qemu.pid and mirror.kernel.mem is not q.sev.kernel.mem
    own, attached = MachineRunner(q), MachineRunner(_attached_view(q, mirror))
    try:
        m_own, m_att = build(own)[1], build(attached)[1]
        for line in ("info tlb", "info mem", "x /32gx $rip", "xp /32gx 0x100000", "gva2gpa $rip",
                     "x /8i $rip", "xp /4x 0xfffff000"):
            assert m_att.run(line) == m_own.run(line), line
    finally:
        own.shutdown()
        attached.shutdown()


def test_cold_info_tlb_through_the_mirror_is_at_the_level_batched_bound():
    q, _, mirror = _qemu_and_mirror()
    view = _attached_view(q, mirror)
    pages, runs = paging.count_table_reads(make_reader("sevmon", q.ram, SevOps(q.ram, q.sev)), q.cpus[0],
                                           q.sev.me_mask)
    runner = MachineRunner(view)
    try:
        s0 = mirror.stats
        build(runner)[1].run("info tlb")
        d = mirror.stats - s0
        assert d.round_trips == runs and runs > 0
        assert d.firmware_calls >= pages
    finally:
        runner.shutdown()


def test_nodbg_guest_gives_no_plaintext_through_the_mirror():
    q, _, mirror = _qemu_and_mirror(policy=1)
    assert mirror.policy == 1  # the firmware's GUEST_STATUS, through the mirror
    runner = MachineRunner(_attached_view(q, mirror))
    try:
        mon = build(runner)[1]
        out = mon.run("info tlb")
        assert out.startswith("Error: ") and "NODBG" in out and out.count("\n") == 1
        gpa = next(iter(q.ram.frames())) << 12  # a frame that is RAM
        assert mon.run(f"xp /4x {gpa:#x}") == f"{gpa:016x}: Cannot access memory\n"
    finally:
        runner.shutdown()
    s0 = mirror.stats
    with pytest.raises(SevError) as ei:  # even asked directly, the firmware refuses
        mirror.dbg_decrypt(gpa, 64)
    assert ei.value.fw_error == 7 and (mirror.stats - s0).round_trips == 1


def test_attach_needs_ptrace_rights_and_a_kvm_guest():
    host = SimulatedHost()
    ram = RAM(16 << 20)
    qemu = SimulatedQemu(host, ram, [(0x100000, bytes(range(256)) * 16)], uid=1000)
    with pytest.raises(SevError) as ei:
        attach_simulated(qemu, uid=1001)
    assert str(ei.value) == ("SEV: cannot map QEMU's RAM backend: pidfd_getfd: Operation not permitted "
                             "(sevmon needs ptrace rights over QEMU: same user, or CAP_SYS_PTRACE)")
    assert ei.value.errno == E.EPERM
    m = attach_simulated(qemu, uid=1001, cap_sys_ptrace=True)
    assert m.dbg_decrypt(0x100000, 16) == bytes(range(16))
    qemu.exit()


def test_the_dev_sev_catch_is_handled():
    """QEMU's /dev/sev fd number differs from sevmon's; the mirror's DBG works because sevmon holds /dev/sev at
    QEMU's number too (without it: EBADF, see test_sev_processes)."""
    host = SimulatedHost()
    qemu = SimulatedQemu(host, RAM(16 << 20), [(0x100000, b"x" * 4096)])
    m = attach_simulated(qemu)
    qemu_sev = next(fd for fd, link in qemu.task.fd_links().items() if link == "/dev/sev")
    assert qemu_sev != m.kernel.sev_fd and m.kernel.task.fd_links()[qemu_sev] == "/dev/sev"
    assert m.dbg_decrypt(0x100000, 4) == b"xxxx"


def test_detaching_closes_every_fd_the_mirror_opened():
    """QEMU's VM fd (taken to name the source), the mirror VM, /dev/sev and its copy at QEMU's number: after close()
    sevmon's process holds none of them (QEMU's guest lives on)."""
    host = SimulatedHost()
    qemu = SimulatedQemu(host, RAM(16 << 20), [(0x100000, b"x" * 4096)])
    m = attach_simulated(qemu)
    me = m.kernel.task
    qemu_sev = next(fd for fd, link in qemu.task.fd_links().items() if link == "/dev/sev")
    held = me.fd_links()
    assert held[qemu_sev] == "/dev/sev" and list(held.values()).count("anon_inode:kvm-vm") == 1  # its own VM only
    m.close()
    left = me.fd_links()
    assert not {fd: link for fd, link in left.items() if link in ("/dev/sev", "anon_inode:kvm-vm")}, left
    assert qemu.query_sev()["state"] == "running"


def test_a_walk_after_the_guest_ran_reads_every_table_again_and_shows_what_changed():
    """Attached, a walk's text is kept (memo) while the guest stays paused. Once the guest ran, the last walk's
    text is shown again only if every table it read, read again now, holds the same bytes: that check costs exactly
    a cold walk's round trips (the level-batched bound), and a table the guest changed shows in the output."""
    q, qemu, mirror = _qemu_and_mirror(workload=True)
    q.stop()
    view = _attached_view(q, mirror)
    view.memory.memo = {}  # as serve --attach keeps it
    own, attached = MachineRunner(q), MachineRunner(view)
    try:
        m_own, m_att = build(own)[1], build(attached)[1]
        _, runs = paging.count_table_reads(make_reader("sevmon", q.ram, SevOps(q.ram, q.sev)), q.cpus[0],
                                           q.sev.me_mask)
        before = {line: m_att.run(line) for line in ("info tlb", "info mem")}
        assert before == {line: m_own.run(line) for line in before}
        s0 = mirror.stats
        assert {line: m_att.run(line) for line in before} == before
        assert (mirror.stats - s0).round_trips == 0  # paused: the kept text
        view.memory.invalidate()  # the guest ran (RESUME), and changed nothing
        s0 = mirror.stats
        assert m_att.run("info tlb") == before["info tlb"]
        assert (mirror.stats - s0).round_trips == runs  # every table read again, as a cold walk reads them
        for _ in range(50):  # the guest runs until its workload has mapped or unmapped a page
            q.program.step()
            q._invalidate()
            if m_own.run("info tlb") != before["info tlb"]:
                break
        now = {line: m_own.run(line) for line in before}
        assert now["info tlb"] != before["info tlb"]
        view.memory.invalidate()
        assert {line: m_att.run(line) for line in before} == now
    finally:
        own.shutdown()
        attached.shutdown()
