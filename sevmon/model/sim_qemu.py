"""A simulated QEMU process owning a live SEV guest, for attaching to it through the same code path as on hardware.

It is what ``qemu-system-x86_64 -accel kvm -object sev-guest,policy=P -object
memory-backend-memfd,id=ram0,share=on`` leaves in the kernel: a process (its own mm and fd table) holding a VM fd
(``anon_inode:kvm-vm``), ``/dev/sev`` (the number stored at LAUNCH_START) and a memfd with guest RAM, the guest
launched and running. sevmon, another process on the same simulated host, reaches it only through
:class:`~sevmon.sev.mirror.MirrorSev`.
"""

from __future__ import annotations

import errno as E
import os

from sevmon.memory.ram import RAM
from sevmon.sev.mirror import MirrorSev, Segment
from sevmon.sev.vm import SevError, SevVm

from .sim_host import SimulatedHost
from .sim_kvm import SimulatedKvm
from .sim_task import MemFd, Task, may_ptrace, pidfd_getfd, pidfd_open


class SimProcessOps:
    """The same operations in the simulated kernel, as sevmon's simulated process (a ``Task``)."""

    def __init__(self, task):
        self.task = task

    def fd_links(self, pid: int) -> dict[int, str]:
        target = self.task.host.tasks.get(pid)
        if target is None:
            raise FileNotFoundError(E.ENOENT, os.strerror(E.ENOENT), f"/proc/{pid}/fd")
        if not may_ptrace(self.task, target):  # /proc/PID/fd needs ptrace read rights
            raise PermissionError(E.EACCES, os.strerror(E.EACCES), f"/proc/{pid}/fd")
        return target.fd_links()

    def pidfd_getfd(self, pid: int, fd: int) -> int:
        pidfd = pidfd_open(self.task, pid)
        try:
            return pidfd_getfd(self.task, pidfd, fd)
        finally:
            self.task.close_fd(pidfd)

    def own_link(self, fd: int) -> str | None:
        f = self.task.files.get(fd)
        return None if f is None else getattr(f, "link", "?")

    def dup2(self, old: int, new: int) -> None:
        self.task.dup2(old, new)

    def close(self, fd: int) -> None:
        self.task.close_fd(fd)


class SimulatedQemu:
    """QEMU with one SEV guest: ``vm`` (its SevVm), ``pid``, and the memfd backend of its RAM."""

    def __init__(self, host: SimulatedHost, ram: RAM, images: list[tuple[int, bytes]], *, policy: int = 0,
                 uid: int = 1000, finish: bool = True, vmsas: list[bytes] = ()):
        """``vmsas``: an SEV-ES guest's vCPUs (policy bit 2), BSP first, as QEMU has KVM encrypt them."""
        self.host = host
        self.task = Task(host, uid=uid)
        self.vm = SevVm(ram, policy=policy, cbitpos=host.cpuid.cbitpos, kernel=SimulatedKvm(host, task=self.task))
        self.vm.launch(images, list(vmsas))
        if finish:
            self.vm.finish()
        self.memfd = MemFd("memory-backend-memfd", ram, self.vm.kernel.mem.guest_hpa)
        self.memfd_fd = self.task.install(self.memfd)

    @classmethod
    def adopt(cls, vm: SevVm) -> SimulatedQemu:
        """An SEV guest already running on the model (e.g. the built-in guest's) seen as QEMU's: its VMM's
        process gets the memfd backend of its RAM."""
        self = cls.__new__(cls)
        self.host, self.task, self.vm = vm.kernel.host, vm.kernel.task, vm
        self.memfd = MemFd("memory-backend-memfd", vm.ram, vm.kernel.mem.guest_hpa)
        self.memfd_fd = self.task.install(self.memfd)
        return self

    @property
    def pid(self) -> int:
        return self.task.pid

    def query_sev(self) -> dict:
        """What QMP ``query-sev`` answers (the fields sevmon needs)."""
        v = self.vm
        return {"enabled": True, "policy": v.policy, "state": v.state_name, "handle": v.handle,
                "api-major": v.api_major, "api-minor": v.api_minor, "build-id": v.build_id}

    def exit(self) -> None:
        self.vm.close()
        self.task.exit()


def attach_simulated(qemu: SimulatedQemu, *, uid: int = 1000, cap_sys_ptrace: bool = False):
    """sevmon's side on the same host: its own process and VM, QEMU's memfd mapped, then the mirror (the
    hardware path with :class:`SimProcessOps`). Returns the :class:`MirrorSev`."""
    me = Task(qemu.host, uid=uid, cap_sys_ptrace=cap_sys_ptrace)
    kernel = SimulatedKvm(qemu.host, task=me)
    procs = SimProcessOps(me)
    pidfd = pidfd_open(me, qemu.pid)  # the RAM backend: /proc/PID/fd/N -> /memfd:... (ptrace rights)
    try:
        memfd = me.files[pidfd_getfd(me, pidfd, qemu.memfd_fd)]
    except OSError as e:
        hint = " (sevmon needs ptrace rights over QEMU: same user, or CAP_SYS_PTRACE)" if e.errno == 1 else ""
        raise SevError(f"SEV: cannot map QEMU's RAM backend: pidfd_getfd: {os.strerror(e.errno)}{hint}",
                       errno=e.errno) from None
    finally:
        me.close_fd(pidfd)
    hva = kernel.mem.map_shared_ram(memfd.ram, memfd.hpa)
    info = qemu.query_sev()
    return MirrorSev(kernel, procs, qemu.pid, [Segment(0, memfd.size, hva)], memfd.ram, policy=info["policy"],
                     cbitpos=qemu.host.cpuid.cbitpos)
