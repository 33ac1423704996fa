"""``serve --attach`` on an SEV guest: the mirror is opened from QEMU's answers (query-sev, query-sev-capabilities,
the pid from SO_PEERCRED) and sevmon's mapping of QEMU's RAM. Driven here on the platform model (a simulated QEMU
process, SimProcessOps); on real hardware the same function runs with LinuxSevTransport and LinuxProcessOps."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sevmon.attach.errors import AttachError
from sevmon.attach.layout import RamRange
from sevmon.attach.ram import MappedRAM
from sevmon.attach.sev import open_mirror, segments_of
from sevmon.memory.ram import RAM
from sevmon.model import SimulatedHost, SimulatedKvm
from sevmon.model.sim_qemu import SimProcessOps, SimulatedQemu
from sevmon.model.sim_task import Task, pidfd_getfd, pidfd_open
from sevmon.sev.mirror import Segment

IMAGE = bytes(range(256)) * 32


def _sevmon_side(qemu: SimulatedQemu, *, uid: int = 1000):
    me = Task(qemu.host, uid=uid)
    kernel = SimulatedKvm(qemu.host, task=me)
    if uid == qemu.task.uid:
        pidfd = pidfd_open(me, qemu.pid)
        memfd = me.files[pidfd_getfd(me, pidfd, qemu.memfd_fd)]
        hva = kernel.mem.map_shared_ram(memfd.ram, memfd.hpa)
    else:
        hva = 0x7F00_0000_0000
    return kernel, SimProcessOps(me), [Segment(0, qemu.memfd.size, hva)]


def test_open_mirror_from_qemus_answers():
    qemu = SimulatedQemu(SimulatedHost(), RAM(16 << 20), [(0x100000, IMAGE)])
    kernel, procs, segs = _sevmon_side(qemu)
    m = open_mirror(qemu.pid, qemu.vm.ram, segs, qemu.query_sev(), {"cbitpos": 47, "reduced-phys-bits": 1},
                    kernel=kernel, procs=procs)
    assert m.dbg_decrypt(0x100000, len(IMAGE)) == IMAGE
    assert m.me_mask == 1 << 47 and m.policy == 0 and m.state_name == "running"
    assert qemu.vm.ram.read(0x100000, 64) != IMAGE[:64]  # at rest it is ciphertext


def test_open_mirror_failures_are_one_sentence():
    qemu = SimulatedQemu(SimulatedHost(), RAM(16 << 20), [(0x100000, IMAGE)])
    kernel, procs, segs = _sevmon_side(qemu, uid=2000)
    with pytest.raises(AttachError) as ei:
        open_mirror(qemu.pid, qemu.vm.ram, segs, qemu.query_sev(), {"cbitpos": 47}, kernel=kernel, procs=procs)
    assert str(ei.value) == (f"SEV: cannot read /proc/{qemu.pid}/fd: sevmon needs ptrace rights over QEMU "
                             "(same user, or CAP_SYS_PTRACE)")
    with pytest.raises(AttachError) as ei:
        open_mirror(None, qemu.vm.ram, segs, qemu.query_sev(), {"cbitpos": 47})
    assert "no SO_PEERCRED" in str(ei.value)


def test_a_host_without_the_cpuid_driver_is_one_sentence():
    """The C-bit and reduced-phys-bits come from CPUID Fn8000_001F, which Python reads through the cpuid driver:
    without /dev/cpu/N/cpuid, attaching ends in one sentence (no traceback), and the mirror VM is closed."""
    from sevmon.sev.linux import host_cpuid
    qemu = SimulatedQemu(SimulatedHost(), RAM(16 << 20), [(0x100000, IMAGE)])
    kernel, procs, segs = _sevmon_side(qemu)
    kernel.cpuid = lambda: host_cpuid("/nonexistent/cpu/0/cpuid")
    with pytest.raises(AttachError) as ei:
        open_mirror(qemu.pid, qemu.vm.ram, segs, qemu.query_sev(), {"cbitpos": 47}, kernel=kernel, procs=procs)
    assert str(ei.value) == ("QEMU runs an SEV guest but sevmon cannot reach it: cannot read CPUID Fn8000_001F: "
                             "/nonexistent/cpu/0/cpuid: No such file or directory (load the cpuid module: "
                             "modprobe cpuid)")
    assert "anon_inode:kvm-vm" not in kernel.task.fd_links().values()  # the mirror VM went with it


def test_segments_follow_the_backend_offsets_around_the_pci_hole():
    m = mmap.mmap(-1, 4 << 20)
    ram = MappedRAM([RamRange(0, 3 << 20, "ram0", 0), RamRange(1 << 32, 1 << 20, "ram0", 3 << 20)], {"ram0": m},
                    4 << 20)
    view = ctypes.c_char.from_buffer(m)
    base = ctypes.addressof(view)
    del view
    assert segments_of(ram) == [Segment(0, 3 << 20, base), Segment(1 << 32, 1 << 20, base + (3 << 20))]
    ram.close()


def test_a_read_across_segments_is_one_ioctl_per_segment():
    """Guest RAM in two pieces of sevmon's mapping (as around the PCI hole): a span over both is cut there."""
    qemu = SimulatedQemu(SimulatedHost(), RAM(16 << 20), [(0x100000, IMAGE)])
    kernel, procs, segs = _sevmon_side(qemu)
    hva = segs[0].hva
    split = [Segment(0, 0x100800, hva), Segment(0x100800, (16 << 20) - 0x100800, hva + 0x100800)]
    m = open_mirror(qemu.pid, qemu.vm.ram, split, qemu.query_sev(), {"cbitpos": 47}, kernel=kernel, procs=procs)
    s0 = m.stats
    assert m.dbg_decrypt(0x100000, 0x1000) == IMAGE[:0x1000]
    assert (m.stats - s0).round_trips == 2


def _serve_attach_to_fake(tmp_path, *kind: str):
    """A stand-in SEV QEMU (fake_sev_qemu.py, ``kind`` e.g. "snp") on a socket, and ``sevmon serve --attach`` run
    against it to its end: (the fake's process, sevmon's CompletedProcess)."""
    sock = tmp_path / "qemu.sock"
    fake = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fake_sev_qemu.py")), str(sock), *kind])
    for _ in range(200):
        if sock.exists():
            break
        time.sleep(0.05)
    try:
        r = subprocess.run([sys.executable, "-m", "sevmon", "serve", "--attach", str(sock),
                            "--qmp", str(tmp_path / "sevmon.sock")], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "PYTHONPATH": os.getcwd()})
    except BaseException:
        fake.kill()
        fake.wait()
        raise
    return fake, r


@pytest.mark.skipif(os.path.exists("/dev/sev"), reason="this host has SEV: the no-SEV sentence does not apply")
def test_serve_attach_to_an_sev_qemu_on_a_host_without_sev_is_one_sentence(tmp_path):
    """The whole attach path (QMP link, SO_PEERCRED, memfd mapping, query-sev, query-sev-capabilities) up to the
    mirror, which a host without /dev/sev cannot have: one sentence, exit 1, QEMU's monitor released."""
    fake, r = _serve_attach_to_fake(tmp_path)
    try:
        assert r.returncode == 1
        assert r.stderr.strip().splitlines() == [
            "sevmon: QEMU runs an SEV guest but sevmon cannot reach it: SEV is not available on this host: "
            "/dev/sev does not exist (needs an AMD EPYC host with SEV enabled in the BIOS and the kvm_amd.sev=1 "
            "module parameter)"]
        fake.wait(10)  # sevmon closed its link: the fake QEMU's monitor loop ended
    finally:
        fake.kill()
        fake.wait()


def test_attach_refuses_an_snp_guest_in_one_sentence(tmp_path):
    """QEMU 9.1+ names an SNP guest in query-sev (sev-type, snp-policy): upstream KVM refuses the debug commands
    for it, so serve --attach says so before opening anything, exit 1."""
    fake, r = _serve_attach_to_fake(tmp_path, "snp")
    try:
        assert r.returncode == 1
        assert r.stderr.strip().splitlines() == [
            "sevmon: the guest is an SEV-SNP guest: upstream KVM refuses the SEV debug commands (DBG_DECRYPT, "
            "DBG_ENCRYPT) for SNP guests (-EPERM), so live debugging needs a patched kernel"]
        assert not (tmp_path / "sevmon.sock").exists()
        fake.wait(10)
    finally:
        fake.kill()
        fake.wait()
