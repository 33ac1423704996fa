"""A live SEV guest that another process (QEMU) owns, decrypted through a mirror VM (live-attach.md).

KVM refuses VM ioctls from any process but the VM's creator (``-EIO``), so sevmon cannot use QEMU's VM fd
directly. It creates its own VM and makes it a mirror of QEMU's (``KVM_CAP_VM_COPY_ENC_CONTEXT_FROM``, Linux
>= 5.15): the same ASID and firmware handle, and only DBG_DECRYPT, DBG_ENCRYPT, GUEST_STATUS and
LAUNCH_UPDATE_VMSA allowed. The steps:

1. QEMU's VM fd is the one whose ``/proc/PID/fd`` link reads ``anon_inode:kvm-vm``; ``pidfd_open`` +
   ``pidfd_getfd`` duplicate it into sevmon (ptrace rights over QEMU needed).
2. ``KVM_ENABLE_CAP(197, fd)`` on sevmon's own VM.
3. The older-kernel catch: firmware commands that KVM issues through ``sev_issue_cmd(kvm, ...)`` look up the
   ``/dev/sev`` fd *number* stored at QEMU's LAUNCH_START in the *calling* process's fd table (the classic
   ``__sev_issue_cmd(sev->fd, ...)``, v4.16 on). sevmon therefore opens ``/dev/sev`` at that same number (``dup2``)
   when it is free; if sevmon already uses the number for something else, attaching fails with one sentence.
   Kernels that check ``/dev/sev`` once at ``KVM_SEV_INIT`` and no longer resolve the fd per command do not need
   it, and it does no harm there.
4. DBG's ``src_uaddr``/``dst_uaddr`` are addresses in sevmon's own mapping of QEMU's shared RAM backend (the same
   physical pages the PSP must see), the destination buffer at the source's page offset (bug (c)).

The same code drives the simulated kernel (:class:`sevmon.model.sim_qemu.SimProcessOps`) and a real host
(:class:`LinuxProcessOps`).
"""

from __future__ import annotations

import errno as E
import os
from dataclasses import dataclass

from sevmon.pidfd import pidfd_getfd

from .abi import (
    KVM_CAP_VM_COPY_ENC_CONTEXT_FROM,
    KVM_ENABLE_CAP,
    SEV_STATE_NAMES,
    GuestState,
    KvmEnableCap,
)
from .vm import SevError, SevVm


@dataclass(frozen=True)
class Segment:
    """``size`` bytes of guest physical memory from ``gpa``, mapped in sevmon at ``hva`` (one backend range)."""

    gpa: int
    size: int
    hva: int


class LinuxProcessOps:
    """The process operations the mirror needs, on a real host."""

    def fd_links(self, pid: int) -> dict[int, str]:
        d = f"/proc/{pid}/fd"
        out = {}
        for name in os.listdir(d):
            try:
                out[int(name)] = os.readlink(f"{d}/{name}")
            except OSError:
                pass
        return out

    def pidfd_getfd(self, pid: int, fd: int) -> int:
        return pidfd_getfd(pid, fd)

    def own_link(self, fd: int) -> str | None:
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None

    def dup2(self, old: int, new: int) -> None:
        os.dup2(old, new, inheritable=False)


class MirrorSev(SevVm):
    """The SEV guest QEMU runs, as sevmon reaches it through its mirror VM: the debug surface of :class:`SevVm`
    (``dbg_decrypt``/``dbg_encrypt``, ``policy``, ``stats``, ``guest_status``) over QEMU's shared RAM."""

    def __init__(self, kernel, procs, qemu_pid: int, segments: list[Segment], ram, *, policy: int,
                 cbitpos: int):
        """``kernel``: sevmon's own VM (a fresh, non-SEV one); ``procs``: the process operations;
        ``segments``: where guest RAM is mapped in sevmon; ``policy``/``cbitpos`` from QEMU (query-sev,
        query-sev-capabilities). The firmware's GUEST_STATUS has the last word on the policy."""
        self.kernel = kernel
        self.ram = ram
        self.policy = policy
        self.cbitpos = cbitpos
        self.cpuid = kernel.cpuid()
        self.reduced_phys_bits = self.cpuid.reduced_phys_bits or 1
        self.handle = 0
        self.measurement = None
        self._state = GuestState.RUNNING
        self.api_major = self.api_minor = self.build_id = 0
        self._segments = sorted(segments, key=lambda s: s.gpa)
        self._attach(procs, qemu_pid)
        handle, fw_policy, state = self.guest_status()
        self.handle, self.policy, self._state = handle, fw_policy, GuestState(state)

    @property
    def me_mask(self) -> int:
        return 1 << self.cbitpos

    @property
    def state_name(self) -> str:
        return SEV_STATE_NAMES.get(self._state, "uninit")

    def _attach(self, procs, pid: int) -> None:
        try:
            links = procs.fd_links(pid)
        except FileNotFoundError:
            raise SevError(f"SEV: no QEMU process {pid}", errno=E.ESRCH) from None
        except PermissionError:
            raise SevError(f"SEV: cannot read /proc/{pid}/fd: sevmon needs ptrace rights over QEMU "
                           "(same user, or CAP_SYS_PTRACE)", errno=E.EPERM) from None
        vm_fds = [fd for fd, link in links.items() if link == "anon_inode:kvm-vm"]
        if not vm_fds:
            raise SevError(f"SEV: QEMU (pid {pid}) has no KVM VM fd (anon_inode:kvm-vm): it does not run the "
                           "guest under KVM", errno=E.ENODEV)
        try:
            src = procs.pidfd_getfd(pid, vm_fds[0])
        except OSError as e:
            hint = (" (sevmon needs ptrace rights over QEMU: same user, or CAP_SYS_PTRACE)"
                    if e.errno == E.EPERM else "")
            raise SevError(f"SEV: cannot take QEMU's VM fd: pidfd_getfd: {os.strerror(e.errno)}{hint}",
                           errno=e.errno) from None
        k = self.kernel
        arg = k.alloc(KvmEnableCap.sizeof())
        try:
            k.write(arg, KvmEnableCap.build(dict(cap=KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, arg0=src)))
            try:
                k.ioctl(k.vm_fd, KVM_ENABLE_CAP, arg)
            except OSError as e:
                why = (": QEMU's VM is not an SEV guest, is itself a mirror, or the kernel is older than 5.15"
                       if e.errno == E.EINVAL else "")
                raise SevError(f"SEV: KVM refused the mirror VM (KVM_CAP_VM_COPY_ENC_CONTEXT_FROM): "
                               f"{os.strerror(e.errno)}{why}", errno=e.errno) from None
        finally:
            k.free(arg)
        sev_fds = [fd for fd, link in links.items() if link == "/dev/sev"]
        if sev_fds and sev_fds[0] != k.sev_fd:  # the older-kernel catch: /dev/sev at QEMU's number
            n = sev_fds[0]
            mine = procs.own_link(n)
            if mine is None:
                procs.dup2(k.sev_fd, n)
            elif mine != "/dev/sev":
                raise SevError(f"SEV: cannot open /dev/sev at fd {n} (QEMU's number, which the kernel resolves "
                               f"in sevmon's fd table): sevmon uses it for {mine}", errno=E.EBUSY)

    # -- guest physical -> sevmon's mapping of QEMU's RAM ------------------------------------------
    def _segment(self, gpa: int) -> Segment | None:
        for s in self._segments:
            if s.gpa <= gpa < s.gpa + s.size:
                return s
        return None

    def _hva(self, gpa: int) -> int:
        s = self._segment(gpa)
        if s is None:
            raise SevError(f"SEV: guest physical address {gpa:#x} is not RAM", errno=E.EFAULT, gpa=gpa)
        return s.hva + gpa - s.gpa

    def _pieces(self, gpa: int, length: int):
        """The span cut where the mapping is not linear (e.g. around the PCI hole): one DBG ioctl each."""
        while length > 0:
            s = self._segment(gpa)
            if s is None:
                raise SevError(f"SEV: guest physical address {gpa:#x} is not RAM", errno=E.EFAULT, gpa=gpa)
            n = min(length, s.gpa + s.size - gpa)
            yield gpa, n
            gpa, length = gpa + n, length - n

    def dbg_decrypt(self, gpa: int, length: int) -> bytes:
        return b"".join(super(MirrorSev, self).dbg_decrypt(g, n) for g, n in self._pieces(gpa, length))

    def dbg_encrypt(self, gpa: int, data: bytes) -> None:
        pos = 0
        for g, n in self._pieces(gpa, len(data)):
            super().dbg_encrypt(g, data[pos:pos + n])
            pos += n

    def _first_hole(self, gpa: int, length: int) -> int | None:
        end = gpa + length
        while gpa < end:
            s = self._segment(gpa)
            if s is None:
                return gpa
            gpa = s.gpa + s.size
        return None

    def close(self) -> None:
        """Close the mirror VM: the guest is QEMU's and lives on."""
        self.kernel.close()

