"""Processes on the simulated host: pid, credentials, an mm and an fd table; ``pidfd_open``/``pidfd_getfd``.

Why it exists: KVM ties a VM to the process that created it (``kvm_vm_ioctl`` returns ``-EIO`` when
``kvm->mm != current->mm``), and a firmware command issued through ``sev_issue_cmd`` resolves the VM's stored
``/dev/sev`` fd *number* in the calling process's fd table. Attaching sevmon to a live SEV guest (a mirror VM,
live-attach.md) is only testable when the model has processes with their own fd tables and the permission check
``pidfd_getfd`` makes (``PTRACE_MODE_ATTACH_REALCREDS``).

fd numbers are unique host-wide in the model (two processes never share a number), so the stored-fd catch of
older kernels always shows up, as it usually does between QEMU and another process on a real host.
"""

from __future__ import annotations

import errno as E
import os

from .sim_host import SimulatedHost
from .sim_process import ProcessMemory


class DevSev:
    """An open ``/dev/sev`` (the ccp driver's file)."""

    link = "/dev/sev"


class PidFd:
    """A pidfd (``pidfd_open``): refers to one process."""

    link = "anon_inode:[pidfd]"

    def __init__(self, pid: int):
        self.pid = pid


class MemFd:
    """A memfd, e.g. QEMU's ``memory-backend-memfd,share=on``: mapping it in another process maps the same
    host physical pages (``ProcessMemory.map_shared_ram``)."""

    def __init__(self, name: str, ram, hpa: int):
        self.link = f"/memfd:{name} (deleted)"
        self.ram = ram
        self.hpa = hpa
        self.size = ram.size


class Task:
    """One process: its pid, uid, capabilities, mm (:class:`ProcessMemory`) and fd table."""

    def __init__(self, host: SimulatedHost, *, uid: int = 1000, cap_sys_ptrace: bool = False,
                 dumpable: bool = True, memlock_limit: int | None = None):
        self.host = host
        self.pid = host.new_pid()
        self.uid = uid
        self.cap_sys_ptrace = cap_sys_ptrace
        self.dumpable = dumpable
        self.mm = ProcessMemory(host, memlock_limit=memlock_limit)
        self.files: dict[int, object] = {}
        self.alive = True
        host.tasks[self.pid] = self

    def install(self, f: object) -> int:
        """A new fd for ``f`` in this process's table."""
        fd = self.host.new_fd()
        self.files[fd] = f
        return fd

    def dup2(self, oldfd: int, newfd: int) -> int:
        """``dup2(2)``: ``newfd`` now refers to the same file as ``oldfd`` (closing what it held)."""
        if oldfd not in self.files:
            raise OSError(E.EBADF, os.strerror(E.EBADF))
        self.files[newfd] = self.files[oldfd]
        return newfd

    def close_fd(self, fd: int) -> None:
        if self.files.pop(fd, None) is None:
            raise OSError(E.EBADF, os.strerror(E.EBADF))

    def fd_links(self) -> dict[int, str]:
        """What ``ls -l /proc/PID/fd`` shows: fd -> link text (``anon_inode:kvm-vm``, ``/dev/sev``, ...)."""
        return {fd: getattr(f, "link", "anon_inode:[unknown]") for fd, f in sorted(self.files.items())}

    def exit(self) -> None:
        self.alive = False
        self.files.clear()
        self.host.tasks.pop(self.pid, None)


def may_ptrace(tracer: Task, target: Task) -> bool:
    """``ptrace_may_access(target, PTRACE_MODE_ATTACH_REALCREDS)`` without LSMs (Yama scope 0):
    CAP_SYS_PTRACE, or the same real uid and a dumpable target."""
    return tracer.cap_sys_ptrace or (tracer.uid == target.uid and target.dumpable)


def pidfd_open(caller: Task, pid: int) -> int:
    """``pidfd_open(pid, 0)``: ESRCH when there is no such process."""
    target = caller.host.tasks.get(pid)
    if target is None or not target.alive:
        raise OSError(E.ESRCH, os.strerror(E.ESRCH))
    return caller.install(PidFd(pid))


def pidfd_getfd(caller: Task, pidfd: int, targetfd: int) -> int:
    """``pidfd_getfd(pidfd, targetfd, 0)``: a duplicate of the target's fd in the caller's table.
    EBADF: not a pidfd, or no such target fd; ESRCH: the process is gone; EPERM: no ptrace rights."""
    p = caller.files.get(pidfd)
    if not isinstance(p, PidFd):
        raise OSError(E.EBADF, os.strerror(E.EBADF))
    target = caller.host.tasks.get(p.pid)
    if target is None or not target.alive:
        raise OSError(E.ESRCH, os.strerror(E.ESRCH))
    if not may_ptrace(caller, target):
        raise OSError(E.EPERM, os.strerror(E.EPERM))
    f = target.files.get(targetfd)
    if f is None:
        raise OSError(E.EBADF, os.strerror(E.EBADF))
    return caller.install(f)
