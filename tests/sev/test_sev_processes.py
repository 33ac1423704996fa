"""Processes in the simulated kernel: VM ownership (EIO), pidfd permissions, the mirror VM, and bug (c).

These are the kernel rules that decide how sevmon can reach a live SEV guest that another process (QEMU) owns
(live-attach.md): the tests drive them with raw ioctls, as sevmon's attach path does.
"""

from __future__ import annotations

import errno as E

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevmon.model import SimulatedKvm
from sevmon.model.sim_host import GUEST_HVA_BASE
from sevmon.model.sim_task import MemFd, Task, pidfd_getfd, pidfd_open
from sevmon.sev.abi import (
    KVM_CAP_VM_COPY_ENC_CONTEXT_FROM,
    KVM_ENABLE_CAP,
    KVM_MEMORY_ENCRYPT_OP,
    KVM_MEMORY_ENCRYPT_REG_REGION,
    PAGE_SIZE,
    KvmEnableCap,
    KvmEncRegion,
    KvmSevCmd,
    KvmSevDbg,
    KvmSevGuestStatus,
    SevCmdId,
    SevRet,
)
from tests.sev.sev_helpers import IMAGE_GPA as A
from tests.sev.sev_helpers import new_vm, raw_op


def ioctl(kvm: SimulatedKvm, fd: int, request: int, struct=None, values: dict | None = None) -> int:
    """One ioctl from ``kvm``'s process on ``fd``: 0 or the errno."""
    arg = 0
    if struct is not None:
        arg = kvm.alloc(struct.sizeof())
        kvm.write(arg, struct.build(values or {}))
    try:
        kvm.ioctl(fd, request, arg)
        return 0
    except OSError as e:
        return e.errno
    finally:
        if arg:
            kvm.free(arg)


def sev_op(kvm: SimulatedKvm, fd: int, cmd_id: int, struct=None, values: dict | None = None):
    """KVM_MEMORY_ENCRYPT_OP on ``fd`` from ``kvm``'s process: (errno or 0, cmd back)."""
    data = 0
    if struct is not None:
        data = kvm.alloc(struct.sizeof())
        kvm.write(data, struct.build(values or {}))
    cmd = kvm.alloc(KvmSevCmd.sizeof())
    kvm.write(cmd, KvmSevCmd.build(dict(id=cmd_id, data=data, sev_fd=kvm.sev_fd)))
    err = 0
    try:
        kvm.ioctl(fd, KVM_MEMORY_ENCRYPT_OP, cmd)
    except OSError as e:
        err = e.errno
    back = KvmSevCmd.parse(kvm.read(cmd, KvmSevCmd.sizeof()))
    return err, back


def qemu_vm_fd(qemu: SimulatedKvm) -> int:
    """QEMU's VM fd, found as sevmon finds it: the ``anon_inode:kvm-vm`` link in /proc/PID/fd."""
    return next(fd for fd, link in qemu.task.fd_links().items() if link == "anon_inode:kvm-vm")


def qemu_sev_fd(qemu: SimulatedKvm) -> int:
    return next(fd for fd, link in qemu.task.fd_links().items() if link == "/dev/sev")


def attach_mirror(qemu_vm, *, dup_sev_fd: bool = True) -> tuple[SimulatedKvm, int]:
    """sevmon's side: own VM, QEMU's VM fd by pidfd_getfd, KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, /dev/sev at the
    stored number, QEMU's shared RAM backend mapped. Returns (mirror, HVA of guest physical 0)."""
    qemu = qemu_vm.kernel
    mirror = SimulatedKvm(qemu.host)
    pidfd = pidfd_open(mirror.task, qemu.task.pid)
    src = pidfd_getfd(mirror.task, pidfd, qemu_vm_fd(qemu))
    assert ioctl(mirror, mirror.vm_fd, KVM_ENABLE_CAP, KvmEnableCap,
                 dict(cap=KVM_CAP_VM_COPY_ENC_CONTEXT_FROM, arg0=src)) == 0
    if dup_sev_fd:
        mirror.task.dup2(mirror.sev_fd, qemu_sev_fd(qemu))
    memfd = MemFd("memory-backend-memfd", qemu.mem.ram, qemu.mem.guest_hpa)
    return mirror, mirror.mem.map_shared_ram(memfd.ram, memfd.hpa)


def decrypt_via(mirror: SimulatedKvm, hva0: int, gpa: int, n: int) -> tuple[int, int, bytes]:
    """DBG_DECRYPT through the mirror, destination at the source's page offset: (errno, fw error, bytes)."""
    off = (hva0 + gpa) & (PAGE_SIZE - 1)
    buf = mirror.alloc(off + n)
    err, cmd, _ = raw_op(mirror, SevCmdId.DBG_DECRYPT, KvmSevDbg,
                         dict(src_uaddr=hva0 + gpa, dst_uaddr=buf + off, len=n))
    return err, cmd.error, mirror.read(buf + off, n)


# -- ownership ---------------------------------------------------------------------------------------
def test_vm_ioctl_from_another_process_is_eio(image):
    """kvm_vm_ioctl: kvm->mm != current->mm -> -EIO, even with a perfectly good (duplicated) VM fd."""
    vm = new_vm(image)
    other = SimulatedKvm(vm.kernel.host)
    fd = pidfd_getfd(other.task, pidfd_open(other.task, vm.kernel.task.pid), qemu_vm_fd(vm.kernel))
    err, _ = sev_op(other, fd, SevCmdId.GUEST_STATUS, KvmSevGuestStatus)
    assert err == E.EIO
    buf = other.alloc(16)
    err, _ = sev_op(other, fd, SevCmdId.DBG_DECRYPT, KvmSevDbg,
                    dict(src_uaddr=GUEST_HVA_BASE + A, dst_uaddr=buf, len=16))
    assert err == E.EIO
    assert other.read(buf, 16) == bytes(16)


def test_pidfd_getfd_needs_ptrace_rights(image):
    vm = new_vm(image)
    host, target = vm.kernel.host, vm.kernel.task
    vmfd = qemu_vm_fd(vm.kernel)
    stranger = Task(host, uid=target.uid + 1)
    with pytest.raises(OSError) as ei:
        pidfd_getfd(stranger, pidfd_open(stranger, target.pid), vmfd)
    assert ei.value.errno == E.EPERM
    root = Task(host, uid=0, cap_sys_ptrace=True)
    assert isinstance(root.files[pidfd_getfd(root, pidfd_open(root, target.pid), vmfd)], SimulatedKvm)
    same_uid = Task(host, uid=target.uid)
    assert pidfd_getfd(same_uid, pidfd_open(same_uid, target.pid), vmfd) in same_uid.files
    target.dumpable = False  # prctl(PR_SET_DUMPABLE, 0) or a setuid QEMU
    with pytest.raises(OSError) as ei:
        pidfd_getfd(same_uid, pidfd_open(same_uid, target.pid), vmfd)
    assert ei.value.errno == E.EPERM
    with pytest.raises(OSError) as ei:
        pidfd_getfd(root, pidfd_open(root, target.pid), 999_999)
    assert ei.value.errno == E.EBADF
    with pytest.raises(OSError) as ei:
        pidfd_open(root, 999_999)
    assert ei.value.errno == E.ESRCH


# -- the mirror VM -----------------------------------------------------------------------------------
def test_mirror_decrypts_the_live_guest(image):
    vm = new_vm(image)
    vm.finish()
    mirror, hva0 = attach_mirror(vm)
    assert mirror.asid == vm.kernel.asid
    err, fw, got = decrypt_via(mirror, hva0, A + 0x123, 0x2345)
    assert (err, fw, got) == (0, 0, image[0x123:0x123 + 0x2345])
    d = mirror.stats
    assert d.firmware_calls == ((A + 0x123 + 0x2345 - 1) >> 12) - ((A + 0x123) >> 12) + 1  # per source page
    # the source guest is unaffected; closing the mirror does not decommission it
    mirror.close()
    assert vm.dbg_decrypt(A, 64) == image[:64]


def test_mirror_needs_dev_sev_at_the_stored_fd_number(image):
    """Kernels whose sev_issue_cmd(kvm, ...) resolves the stored /dev/sev fd number in the caller's table."""
    vm = new_vm(image)
    mirror, hva0 = attach_mirror(vm, dup_sev_fd=False)
    assert decrypt_via(mirror, hva0, A, 16)[0] == E.EBADF
    mirror.task.dup2(mirror.sev_fd, qemu_sev_fd(vm.kernel))
    assert decrypt_via(mirror, hva0, A, 16) == (0, 0, image[:16])


def test_mirror_refuses_commands_outside_the_allow_list(image):
    vm = new_vm(image)
    mirror, _ = attach_mirror(vm)
    s0 = vm.kernel.host.psp.commands
    for cid in (SevCmdId.INIT, SevCmdId.LAUNCH_START, SevCmdId.LAUNCH_UPDATE_DATA, SevCmdId.LAUNCH_MEASURE,
                SevCmdId.LAUNCH_SECRET, SevCmdId.LAUNCH_FINISH, SevCmdId.GET_ATTESTATION_REPORT,
                SevCmdId.SEND_START, SevCmdId.RECEIVE_START):
        err, cmd = sev_op(mirror, mirror.vm_fd, cid)
        assert err == E.EINVAL, cid
    assert vm.kernel.host.psp.commands == s0  # refused before any firmware command
    err, _ = sev_op(mirror, mirror.vm_fd, SevCmdId.LAUNCH_UPDATE_VMSA)
    assert err == E.ENOTTY  # allowed from a mirror, but not an SEV-ES guest
    err, _ = sev_op(mirror, mirror.vm_fd, SevCmdId.GUEST_STATUS, KvmSevGuestStatus)
    assert err == 0
    assert ioctl(mirror, mirror.vm_fd, KVM_MEMORY_ENCRYPT_REG_REGION, KvmEncRegion,
                 dict(addr=GUEST_HVA_BASE, size=PAGE_SIZE)) == E.EINVAL


def test_copy_enc_context_errors(image):
    vm = new_vm(image)
    host = vm.kernel.host
    plain = SimulatedKvm(host)  # a VM that is not an SEV guest
    me = SimulatedKvm(host)
    pid = vm.kernel.task.pid

    def enable(kvm, fd, **kw):
        return ioctl(kvm, kvm.vm_fd, KVM_ENABLE_CAP, KvmEnableCap,
                     dict(cap=kw.get("cap", KVM_CAP_VM_COPY_ENC_CONTEXT_FROM), arg0=fd, flags=kw.get("flags", 0)))

    src = pidfd_getfd(me.task, pidfd_open(me.task, pid), qemu_vm_fd(vm.kernel))
    assert enable(me, me.sev_fd) == E.EBADF          # not a KVM VM fd
    assert enable(me, 12345) == E.EBADF              # no such fd in the caller's table
    assert enable(me, src, flags=1) == E.EINVAL
    notsev = pidfd_getfd(me.task, pidfd_open(me.task, plain.task.pid), qemu_vm_fd(plain))
    assert enable(me, notsev) == E.EINVAL            # the source is not an SEV guest
    assert enable(vm.kernel, vm.kernel.vm_fd) == E.EINVAL  # an SEV guest cannot become a mirror
    assert enable(me, src) == 0
    assert enable(me, src) == E.EINVAL               # already mirroring (sev_guest)
    other = SimulatedKvm(host)
    mfd = pidfd_getfd(other.task, pidfd_open(other.task, me.task.pid), me.vm_fd)
    assert enable(other, mfd) == E.EINVAL            # a mirror of a mirror


def test_mirror_of_a_nodbg_guest_gets_policy_failure_and_no_plaintext(image):
    vm = new_vm(image, policy=0x1)
    mirror, hva0 = attach_mirror(vm)
    err, fw, got = decrypt_via(mirror, hva0, A, 64)
    assert (err, fw) == (E.EIO, SevRet.POLICY_FAILURE)
    assert got == bytes(64)


def test_the_guest_outlives_its_vmm_fd_while_a_mirror_holds_it(image):
    vm = new_vm(image)
    mirror, hva0 = attach_mirror(vm)
    psp = vm.kernel.host.psp
    assert decrypt_via(mirror, hva0, A, 32) == (0, 0, image[:32])
    vm.kernel.close()  # QEMU closes its VM fd; the mirror's reference keeps the context (kvm_get_kvm)
    assert psp.guest_count == 1
    mirror.close()  # the last reference: now DEACTIVATE + DECOMMISSION
    assert psp.guest_count == 0


# -- bug (c): the destination overrun of the classic sev_dbg_crypt -------------------------------------
def test_classic_kernel_overruns_into_the_next_physical_page(image):
    """An aligned 4 KiB chunk aimed 16 bytes into a destination page: the PSP writes 16 bytes past the single
    pinned page, into the physically next page, which belongs to someone else (here: another process)."""
    vm = new_vm(image)
    k = vm.kernel
    victim_proc = SimulatedKvm(k.host)
    prev = victim_proc.mem.page_hpa(victim_proc.alloc(PAGE_SIZE))
    while True:  # past the recycled pages: fresh pages are handed out top down, one below the other
        victim = victim_proc.alloc(PAGE_SIZE)
        hpa = victim_proc.mem.page_hpa(victim)
        if hpa == prev - PAGE_SIZE:
            break
        prev = hpa
    victim_proc.write(victim, b"\xAA" * PAGE_SIZE)
    buf = k.alloc(2 * PAGE_SIZE)
    assert k.mem.page_hpa(buf) + PAGE_SIZE == victim_proc.mem.page_hpa(victim)
    err, cmd, _ = raw_op(k, SevCmdId.DBG_DECRYPT, KvmSevDbg,
                         dict(src_uaddr=GUEST_HVA_BASE + A, dst_uaddr=buf + 16, len=PAGE_SIZE))
    assert (err, cmd.error) == (0, 0)
    assert victim_proc.read(victim, 16) == image[PAGE_SIZE - 16:PAGE_SIZE]  # the other process's page: corrupted
    assert victim_proc.read(victim + 16, 16) == b"\xAA" * 16
    assert k.read(buf + PAGE_SIZE, 16) == bytes(16)  # and the caller never got those 16 bytes


def classic_chunks(src: int, dst: int, n: int):
    """The classic split (source page boundaries only): (dst offset in its page, length) of each chunk."""
    while n:
        m = min(PAGE_SIZE - (src & (PAGE_SIZE - 1)), n)
        yield dst & (PAGE_SIZE - 1), m
        src, dst, n = src + m, dst + m, n - m


class DbgSpy:
    """Records every KVM_SEV_DBG_* request sevmon makes (src_uaddr, dst_uaddr, len)."""

    def __init__(self, kvm: SimulatedKvm):
        self.requests = []
        real = kvm.ioctl

        def spy(fd, request, arg=0):
            if request == KVM_MEMORY_ENCRYPT_OP:
                cmd = KvmSevCmd.parse(kvm.read(arg, KvmSevCmd.sizeof()))
                if cmd.id in (SevCmdId.DBG_DECRYPT, SevCmdId.DBG_ENCRYPT):
                    d = KvmSevDbg.parse(kvm.read(cmd.data, KvmSevDbg.sizeof()))
                    self.requests.append((d.src_uaddr, d.dst_uaddr, d.len))
            return real(fd, request, arg)

        kvm.ioctl = spy


@settings(max_examples=60, deadline=None)
@given(off=st.integers(0, 0x5000), n=st.integers(1, 0x3000), encrypt=st.booleans())
def test_sevmons_own_path_never_sends_a_chunk_across_a_destination_page(off, n, encrypt):
    """SevVm.dbg_decrypt/encrypt put the destination at the source's page offset: no chunk of the classic split
    crosses a destination page, so the overrun above cannot happen, and the data is right."""
    image = bytes(range(256)) * 0x90  # covers off + n
    vm = new_vm(image)
    spy = DbgSpy(vm.kernel)
    if encrypt:
        data = bytes((i * 7) & 0xFF for i in range(n))
        vm.dbg_encrypt(A + off, data)
    got = vm.dbg_decrypt(A + off, n)
    if not encrypt:
        assert got == image[off:off + n]
    assert spy.requests
    for src, dst, length in spy.requests:
        assert (src & (PAGE_SIZE - 1)) == (dst & (PAGE_SIZE - 1))
        assert all(d_off + m <= PAGE_SIZE for d_off, m in classic_chunks(src, dst, length))
