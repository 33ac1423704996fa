"""The simulated kernel's KVM side: one VM fd and its ``KVM_MEMORY_ENCRYPT_OP`` handlers, plus ``/dev/sev``.

(The same structs on real hardware: :mod:`sevmon.sev.linux`. The host: :mod:`sevmon.model.sim_host`. The VMM
process's memory and pinning: :mod:`sevmon.model.sim_process`.) It models Linux's *classic*
``arch/x86/kvm/svm/sev.c`` (v4.16 up to the 2026 rewrite, with the Nov-2020 offset fix; sev-api.md §2.1) closely
enough that round trips, firmware calls, errno values, the ``error`` field and the known bugs come out as on real
hardware:

* one ioctl is one user->kernel round trip; the ``kvm_sev_cmd`` is copied back even on failure;
* DBG_{DE,EN}CRYPT split only at *source* page boundaries, one PSP command per chunk, a
  bounce page for unaligned decrypts, and a read-modify-write (two PSP commands) for
  unaligned encrypts — including bug (b): the RMW re-encrypts ``round_up(len, 16)`` bytes
  from the rounded-down destination, silently dropping bytes past that;
* bug (c) (an aligned chunk whose destination crosses a page writes past the single pinned
  destination page) really corrupts the physically next page: each page of a user buffer has its
  own host physical page, not contiguous with the next one (guest RAM is one contiguous slot);
* processes (:mod:`sevmon.model.sim_task`): a VM belongs to the process that created it (ioctls from
  another one: ``-EIO``); ``KVM_CAP_VM_COPY_ENC_CONTEXT_FROM`` makes a mirror VM that may issue only
  LAUNCH_UPDATE_VMSA, GUEST_STATUS, DBG_DECRYPT and DBG_ENCRYPT (others, and REG/UNREG_REGION:
  ``-EINVAL``); firmware commands resolve the stored ``/dev/sev`` fd number in the caller's table;
* errno: ``-ENOTTY`` not an SEV guest, ``-EINVAL`` bad arguments, ``-EFAULT`` bad user
  pointers, ``-ENOMEM`` pin failures, ``-EBADF`` no ``/dev/sev``, ``-EIO`` firmware errors.

Choices where the model has to decide (documented, not guessed at silently):

* ``KVM_MEMORY_ENCRYPT_REG_REGION`` only does the bookkeeping (memlock accounting, region
  list); it does not fault in absent frames.
* Large aligned transfers are *counted* as one PSP command per source page but executed as one
  engine pass per physically contiguous run (see :meth:`SevFirmware.dbg_crypt`); fault
  injection splits the run at the failing command, so the outcome is the same as issuing them
  one by one.
* SEND_*/RECEIVE_* (migration) are :mod:`sevmon.model.sim_migration`'s ops, as the kernel's.
* ``/dev/sev`` (``SEV_ISSUE_CMD``) serves PLATFORM_STATUS, PDH_CERT_EXPORT and GET_ID2, what
  QEMU uses; the other commands answer ``-EINVAL``.
* The host runs without SME, so the PSP gets plain host physical addresses (no C-bit).
"""

from __future__ import annotations

import errno as E
import os
import threading

from construct import Container

from sevmon.memory.ram import RAM, MemoryAccessError
from sevmon.sev.abi import (
    KVM_CAP_VM_COPY_ENC_CONTEXT_FROM,
    KVM_ENABLE_CAP,
    KVM_MEMORY_ENCRYPT_OP,
    KVM_MEMORY_ENCRYPT_REG_REGION,
    KVM_MEMORY_ENCRYPT_UNREG_REGION,
    PAGE_SHIFT,
    PAGE_SIZE,
    SEV_FW_BLOB_MAX_SIZE,
    SEV_INIT_FLAGS_SEV_ES,
    SEV_ISSUE_CMD,
    VMSA_SIZE,
    FwCmd,
    KvmEnableCap,
    KvmEncRegion,
    KvmSevAttestationReport,
    KvmSevCmd,
    KvmSevGuestStatus,
    KvmSevLaunchMeasure,
    KvmSevLaunchSecret,
    KvmSevLaunchStart,
    KvmSevLaunchUpdateData,
    PlatformState,
    SevCmdId,
    SevDataActivate,
    SevDataAttestationReport,
    SevDataGuestStatus,
    SevDataHandle,
    SevDataInit,
    SevDataLaunchSecret,
    SevDataLaunchStart,
    SevDataLaunchUpdate,
)
from sevmon.sev.cpuid import SevCpuid
from sevmon.sev.stats import KernelStats

from .sim_dbg import DebugCrypt
from .sim_devsev import SevDeviceIoctls
from .sim_host import KernelError, SimulatedHost
from .sim_migration import MigrationOps
from .sim_process import ProcessMemory
from .sim_task import DevSev, Task

_U64 = (1 << 64) - 1

# is_cmd_allowed_from_mirror: the only KVM_SEV_* commands a mirror VM may issue (others: -EINVAL)
MIRROR_ALLOWED = frozenset({SevCmdId.LAUNCH_UPDATE_VMSA, SevCmdId.GUEST_STATUS, SevCmdId.DBG_DECRYPT,
                            SevCmdId.DBG_ENCRYPT})


class _Vcpu:
    """One vCPU of the VM: its reset save area, then (SEV-ES, after LAUNCH_UPDATE_VMSA) its encrypted VMSA page."""

    def __init__(self, save_area: bytes):
        self.save_area = save_area
        self.vmsa_hpa: int | None = None


class SimulatedKvm(SevDeviceIoctls, DebugCrypt, MigrationOps):
    """One VM fd (plus the process's ``/dev/sev`` fd) of a VMM process on a simulated host.

    The VMM-facing surface is what :class:`LinuxSevTransport` offers too: ``vm_fd``, ``sev_fd``,
    :meth:`ioctl`, process memory (:meth:`alloc`, :meth:`free`, :meth:`read`, :meth:`write`,
    :meth:`map_guest_ram`), :meth:`cpuid`, :meth:`close`; plus, in simulation only, the guest's
    own CPU accesses (:meth:`guest_store`, :meth:`guest_load`) and fault injection.
    """

    link = "anon_inode:kvm-vm"  # what /proc/PID/fd shows for a VM fd

    def __init__(self, host: SimulatedHost | None = None, *, memlock_limit: int | None = None,
                 task: Task | None = None):
        """``memlock_limit``: RLIMIT_MEMLOCK in bytes; None models CAP_IPC_LOCK (no limit).
        ``task``: the process that creates the VM (default: a new one); it owns the VM (``kvm->mm``)."""
        self.host = host if host is not None else SimulatedHost()
        self.task = task if task is not None else Task(self.host, memlock_limit=memlock_limit)
        self.mem: ProcessMemory = self.task.mm
        self.vm_fd = self.task.install(self)
        self.sev_fd = self.task.install(DevSev())
        self.stats = KernelStats()
        self._faults: dict[int, int] = {}
        # struct kvm_sev_info
        self._active = False
        self._asid = 0
        self._handle = 0
        self._fd: int | None = None
        self._policy = 0
        self._regions: list[tuple[int, int, int]] = []
        self._closed = False
        self._mirror_of: SimulatedKvm | None = None  # set by KVM_CAP_VM_COPY_ENC_CONTEXT_FROM
        self._mirrors = 0                           # mirrors holding a reference to this VM
        self._kvm_lock = threading.Lock()   # kvm->lock: one SEV command per VM at a time
        self._es = False                    # sev->es_active (KVM_SEV_ES_INIT)
        self.vcpus: list[_Vcpu] = []        # KVM_CREATE_VCPU, in creation order

    # -- process memory (what the VMM does in its own address space) ------------------------
    def alloc(self, n: int) -> int:
        """malloc: a zeroed user buffer; returns its address (HVA)."""
        return self.mem.alloc(n)

    def free(self, hva: int) -> None:
        self.mem.free(hva)

    def read(self, hva: int, n: int) -> bytes:
        return self.mem.read(hva, n)

    def write(self, hva: int, data: bytes) -> None:
        self.mem.write(hva, data)

    def map_guest_ram(self, ram: RAM) -> int:
        """mmap the guest's RAM into the process; returns the HVA of guest physical address 0."""
        return self.mem.map_guest_ram(ram)

    @property
    def asid(self) -> int:
        """The ASID KVM gave this VM (0 before KVM_SEV_INIT)."""
        return self._asid

    def cpuid(self) -> SevCpuid:
        """CPUID Fn8000_001F of the host."""
        return self.host.cpuid

    def close(self) -> None:
        """Close the VM fd: KVM's ``sev_vm_destroy`` (unpin, DEACTIVATE, DECOMMISSION, free ASID)."""
        with self._kvm_lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._regions.clear()
        for vcpu in self.vcpus:  # kvm_destroy_vcpus: each vCPU's VMSA page goes back
            if vcpu.vmsa_hpa is not None:
                self.host.kfree(vcpu.vmsa_hpa)
                vcpu.vmsa_hpa = None
        for fd in (self.vm_fd, self.sev_fd):  # as LinuxSevTransport.close: the VM fd and /dev/sev are closed
            self.task.files.pop(fd, None)
        src = self._mirror_of
        if src is not None:  # a mirror owns no firmware context: drop its reference to the source
            self._active, self._asid, self._mirror_of = False, 0, None
            with src._kvm_lock:
                src._mirrors -= 1
                if src._closed and not src._mirrors:
                    src._destroy_sev()
        elif self._mirrors:
            pass  # the mirrors hold a reference (kvm_get_kvm): the guest lives on until the last one closes
        else:
            self._destroy_sev()
        self.mem.release()

    def _destroy_sev(self) -> None:
        """``sev_vm_destroy`` of a VM that owns its context: DEACTIVATE, DECOMMISSION, free the ASID."""
        if self._active:
            if self._handle:
                self._fw(FwCmd.DEACTIVATE, bytearray(SevDataHandle.build(dict(handle=self._handle))))
                self._fw(FwCmd.DECOMMISSION, bytearray(SevDataHandle.build(dict(handle=self._handle))))
            self.host.asid_release(self._asid)
            self._active = False
            self._asid = 0

    # -- simulation-only hooks ---------------------------------------------------------------
    def fail_firmware_call(self, n: int, status: int) -> None:
        """Make this VM's ``n``-th PSP command from now (1 = the next one) fail with ``status``
        without executing; the kernel sees it exactly like a real firmware error."""
        if n < 1 or not status:
            raise ValueError("n counts from 1 and status must be a failure code")
        self._faults[self.stats.firmware_calls + n] = int(status)

    def guest_store(self, gpa: int, data: bytes, *, c_bit: bool = True) -> None:
        """The guest's own CPU store: through its ASID's key when the C-bit is set, plaintext
        (shared) otherwise. Not a debug access: no ioctl, no PSP command, not counted."""
        ram = self._guest_ram(gpa, len(data))
        asid = self._cpu_asid(c_bit)
        for pfn in range(gpa >> PAGE_SHIFT, (gpa + len(data) + PAGE_SIZE - 1) >> PAGE_SHIFT):
            ram.ensure(pfn)
        self.host.mc.write(self.mem.guest_hpa + gpa, data, asid)

    def guest_load(self, gpa: int, n: int, *, c_bit: bool = True) -> bytes:
        """The guest's own CPU load; MemoryAccessError if a frame is not RAM."""
        ram = self._guest_ram(gpa, n)
        asid = self._cpu_asid(c_bit)
        for pfn in range(gpa >> PAGE_SHIFT, (gpa + n + PAGE_SIZE - 1) >> PAGE_SHIFT):
            if not ram.has(pfn):
                raise MemoryAccessError(max(gpa, pfn << PAGE_SHIFT))
        return self.host.mc.read(self.mem.guest_hpa + gpa, n, asid)

    def guest_zero_page(self, gpa: int) -> bytes:
        """The bytes at rest of a page of zeros the guest stored with the C-bit at ``gpa`` (plain zeros while it
        has no key): what a never-written frame of a guest that cleared its RAM holds. Stores nothing."""
        if not self._asid or not self.host.mc.has_key(self._asid):
            return bytes(PAGE_SIZE)
        return self.host.mc.encrypt_at(self.mem.guest_hpa + gpa, bytes(PAGE_SIZE), self._asid)

    def _cpu_asid(self, c_bit: bool) -> int:
        if not c_bit:
            return 0
        if not self._asid or not self.host.mc.has_key(self._asid):
            raise LookupError("the guest has no memory encryption key (no LAUNCH_START/ACTIVATE yet)")
        return self._asid

    def _guest_ram(self, gpa: int, n: int) -> RAM:
        ram = self.mem.ram
        if ram is None or self._closed:
            raise LookupError("the VM has no guest RAM mapped (not set up, or closed)")
        if gpa < 0 or gpa + n > ram.size:
            raise MemoryAccessError(gpa)
        return ram

    # -- the ioctl entry point ---------------------------------------------------------------
    def ioctl(self, fd: int, request: int, arg: int = 0) -> int:
        """``ioctl(2)``: returns 0 or raises OSError(errno), like ``fcntl.ioctl``."""
        with self._kvm_lock:
            r = self._ioctl_locked(fd, request, arg)
        if r < 0:
            raise OSError(-r, os.strerror(-r))
        return r

    def _ioctl_locked(self, fd: int, request: int, arg: int) -> int:
        """The ioctl as this VM's creating process issues it: ``fd`` is looked up in its fd table."""
        self.stats.round_trips += 1
        f = None if self._closed else self.task.files.get(fd)
        if f is None:
            r = -E.EBADF
        elif isinstance(f, SimulatedKvm):
            if f.mem is not self.mem:  # kvm_vm_ioctl: kvm->mm != current->mm
                r = -E.EIO
            elif f is not self:
                r = -E.ENOTTY  # a second VM in one process is not modelled
            elif request == KVM_MEMORY_ENCRYPT_OP:
                r = self._mem_enc_op(arg)
            elif request == KVM_MEMORY_ENCRYPT_REG_REGION:
                r = self._region_ioctl(arg, register=True)
            elif request == KVM_MEMORY_ENCRYPT_UNREG_REGION:
                r = self._region_ioctl(arg, register=False)
            elif request == KVM_ENABLE_CAP:
                r = self._enable_cap(arg)
            else:
                r = -E.ENOTTY
        elif isinstance(f, DevSev) and request == SEV_ISSUE_CMD:
            r = self._sev_dev_ioctl(arg)
        else:
            r = -E.ENOTTY
        return r

    # -- KVM_ENABLE_CAP(KVM_CAP_VM_COPY_ENC_CONTEXT_FROM) ---------------------------------------
    def _enable_cap(self, arg: int) -> int:
        """``sev_vm_copy_enc_context_from``: make this VM a mirror of the SEV VM behind ``args[0]``, an fd
        resolved in the caller's table (no mm check on the source). It then shares the source's ASID,
        firmware handle, policy and stored ``/dev/sev`` fd number."""
        try:
            cap = KvmEnableCap.parse(self.mem.uread(arg, KvmEnableCap.sizeof()))
        except KernelError:
            return -E.EFAULT
        if cap.cap != KVM_CAP_VM_COPY_ENC_CONTEXT_FROM or cap.flags:
            return -E.EINVAL
        src = self.task.files.get(cap.arg0)
        if not isinstance(src, SimulatedKvm) or src._closed:  # fdget / file_is_kvm
            return -E.EBADF
        if src is self:
            return -E.EINVAL
        with src._kvm_lock:  # sev_lock_two_vms
            if self._active or not src._active or src._mirror_of is not None:
                return -E.EINVAL  # this VM is SEV already, the source is not SEV, or is itself a mirror
            self._active, self._asid, self._handle = True, src._asid, src._handle
            self._fd, self._policy, self._mirror_of = src._fd, src._policy, src
            src._mirrors += 1
        return 0

    def _stored_sev_fd_ok(self) -> bool:
        """``__sev_issue_cmd(sev->fd)``: the stored number must be ``/dev/sev`` in the caller's fd table."""
        return isinstance(self.task.files.get(self._fd), DevSev)

    # -- PSP access ---------------------------------------------------------------------------
    def _fw(self, fwcmd: int, buf: bytearray, cmd: Container | None = None) -> int:
        """``__sev_do_cmd_locked``: one PSP command; ``cmd.error`` gets its status."""
        self.stats.firmware_calls += 1
        status = self._faults.pop(self.stats.firmware_calls, None)
        if status is None:
            status = self.host.psp_call(fwcmd, buf)
        else:
            self.host.psp_count_failed()
        if cmd is not None:
            cmd.error = int(status)
        return -E.EIO if status else 0

    def _sev_issue(self, fwcmd: int, buf: bytearray, cmd: Container) -> int:
        """``sev_issue_cmd``: through the ``/dev/sev`` fd stored at LAUNCH_START."""
        if not self._stored_sev_fd_ok():
            raise KernelError(E.EBADF)
        return self._fw(fwcmd, buf, cmd)

    # -- KVM_MEMORY_ENCRYPT_{REG,UNREG}_REGION ------------------------------------------------
    def _region_ioctl(self, arg: int, *, register: bool) -> int:
        try:
            rg = KvmEncRegion.parse(self.mem.uread(arg, KvmEncRegion.sizeof()))
        except KernelError:
            return -E.EFAULT
        if not self._active:
            return -E.ENOTTY
        if self._mirror_of is not None:
            return -E.EINVAL  # a mirror is not responsible for the guest's memory
        if register:
            if rg.size == 0 or rg.addr + rg.size > _U64:
                return -E.EINVAL
            npages = ((rg.addr + rg.size - 1) >> PAGE_SHIFT) - (rg.addr >> PAGE_SHIFT) + 1
            try:
                self.mem.charge(npages)
            except KernelError as e:
                return -e.code
            self.mem.pages_locked += npages
            self._regions.append((rg.addr, rg.size, npages))
            return 0
        for i, (addr, size, npages) in enumerate(self._regions):
            if addr == rg.addr and size == rg.size:
                del self._regions[i]
                self.mem.pages_locked -= npages
                return 0
        return -E.EINVAL

    # -- KVM_MEMORY_ENCRYPT_OP -------------------------------------------------------------------
    def _mem_enc_op(self, argp: int) -> int:
        if not self.host.sev_enabled:
            return -E.ENOTTY
        if not argp:
            return 0
        try:
            cmd = KvmSevCmd.parse(self.mem.uread(argp, KvmSevCmd.sizeof()))
        except KernelError:
            return -E.EFAULT
        cid = cmd.id
        if cid == SevCmdId.ES_INIT and not self.host.sev_es_enabled:
            return -E.ENOTTY
        if self._mirror_of is not None and cid not in MIRROR_ALLOWED:
            return -E.EINVAL  # is_cmd_allowed_from_mirror; no copy back
        handler = self._dispatch.get(cid)
        if handler is None:
            return -E.EINVAL  # unknown or never-dispatched id: no copy back
        try:
            r = handler(self, cmd)
        except KernelError as e:
            r = -e.code
        try:
            self.mem.uwrite(argp, KvmSevCmd.build(cmd))
        except KernelError:
            r = -E.EFAULT
        return r

    def _data(self, cmd: Container, struct) -> Container:
        return struct.parse(self.mem.uread(cmd.data, struct.sizeof()))

    def _require_sev(self) -> None:
        if not self._active:
            raise KernelError(E.ENOTTY)

    def _op_init(self, cmd: Container, es: bool = False) -> int:
        if self._active:
            raise KernelError(E.EINVAL)
        asid = self._asid_new(cmd, es)
        if self.host.platform_state == PlatformState.UNINIT:  # sev_platform_init: INIT + DF_FLUSH
            flags = SEV_INIT_FLAGS_SEV_ES if self.host.cpuid.sev_es else 0
            r = self._fw(FwCmd.INIT, bytearray(SevDataInit.build({"flags": flags})), cmd)
            if not r:
                r = self._fw(FwCmd.DF_FLUSH, bytearray(), cmd)
            if r:
                self.host.asid_release(asid)
                return r
        self._active, self._asid, self._es = True, asid, es
        return 0

    def _asid_new(self, cmd: Container, es: bool = False) -> int:
        """``sev_asid_new``: an SEV-ES guest takes an ASID below ``min_sev_asid``, a plain SEV guest one from it."""
        cpuid = self.host.cpuid
        lo, hi = cpuid.min_sev_asid, cpuid.num_encrypted_guests
        if es:
            lo, hi = 1, cpuid.min_sev_asid - 1
        if lo > hi:
            raise KernelError(E.ENOTTY)
        return self.host.asid_take(lo, hi, flush=lambda: not self._fw(FwCmd.DF_FLUSH, bytearray()))

    def _check_sev_fd(self, cmd) -> None:
        """``__sev_issue_cmd(argp->sev_fd)``: the fd must be /dev/sev in the caller's own fd table."""
        if not isinstance(self.task.files.get(cmd.sev_fd), DevSev):
            raise KernelError(E.EBADF)

    def _bind_asid(self, handle: int, cmd) -> int:
        """``sev_bind_asid``: ACTIVATE the new guest context on this VM's ASID, or DECOMMISSION it on failure."""
        r = self._fw(FwCmd.ACTIVATE, bytearray(SevDataActivate.build(dict(handle=handle, asid=self._asid))), cmd)
        if r:
            self._fw(FwCmd.DECOMMISSION, bytearray(SevDataHandle.build(dict(handle=handle))))
        return r

    def _op_launch_start(self, cmd: Container) -> int:
        self._require_sev()
        params = self._data(cmd, KvmSevLaunchStart)
        self._policy = params.policy
        blobs = []
        try:
            dh_hpa = sess_hpa = 0
            if params.dh_uaddr:
                dh_hpa = self.mem.copy_user_blob(params.dh_uaddr, params.dh_len)
                blobs.append(dh_hpa)
            if params.session_uaddr:
                sess_hpa = self.mem.copy_user_blob(params.session_uaddr, params.session_len)
                blobs.append(sess_hpa)
            start = bytearray(SevDataLaunchStart.build(dict(
                handle=params.handle, policy=params.policy,
                dh_cert_address=dh_hpa, dh_cert_len=params.dh_len if dh_hpa else 0,
                session_address=sess_hpa, session_len=params.session_len if sess_hpa else 0)))
            self._check_sev_fd(cmd)
            r = self._fw(FwCmd.LAUNCH_START, start, cmd)
            if r:
                return r
            handle = SevDataLaunchStart.parse(bytes(start)).handle
            r = self._bind_asid(handle, cmd)
            if r:
                return r
            params.handle = handle
            try:
                self.mem.uwrite(cmd.data, KvmSevLaunchStart.build(params))
            except KernelError:
                self._fw(FwCmd.DEACTIVATE, bytearray(SevDataHandle.build(dict(handle=handle))))
                self._fw(FwCmd.DECOMMISSION, bytearray(SevDataHandle.build(dict(handle=handle))))
                raise
            self._handle = handle
            self._fd = cmd.sev_fd
            return 0
        finally:
            for hpa in blobs:
                self.host.kfree(hpa)

    def _op_launch_update_data(self, cmd: Container) -> int:
        self._require_sev()
        params = self._data(cmd, KvmSevLaunchUpdateData)
        vaddr, size = params.uaddr, params.len
        pages = self.mem.pin(vaddr, size)
        try:
            end, i, r = vaddr + size, 0, 0
            while vaddr < end:
                offset = vaddr & (PAGE_SIZE - 1)
                run = 1  # get_num_contig_pages
                while i + run < len(pages) and pages[i + run] == pages[i + run - 1] + PAGE_SIZE:
                    run += 1
                n = min(run * PAGE_SIZE - offset, size)
                buf = bytearray(SevDataLaunchUpdate.build(dict(handle=self._handle, address=pages[i] + offset, len=n)))
                r = self._sev_issue(FwCmd.LAUNCH_UPDATE_DATA, buf, cmd)
                if r:
                    break
                size -= n
                vaddr += n
                i += run
            return r
        finally:
            self.mem.unpin(pages)

    def _op_launch_measure(self, cmd: Container) -> int:
        self._require_sev()
        params = self._data(cmd, KvmSevLaunchMeasure)
        return self._blob_to_user(cmd, params, KvmSevLaunchMeasure, FwCmd.LAUNCH_MEASURE, SevDataLaunchUpdate)

    def _blob_to_user(self, cmd: Container, params: Container, kvm_struct, fwcmd: int, fw_struct,
                      **fields) -> int:
        """KVM's pattern for the commands that hand back a firmware blob (LAUNCH_MEASURE,
        ATTESTATION_REPORT): ``len == 0`` is a length query; otherwise the PSP writes into a
        kernel buffer that is copied to the user's. The PSP's ``len`` is copied back either
        way. ``fields`` are extra inputs sent only with a real request."""
        blob = None
        address = length = 0
        if params.len and params.uaddr:
            if params.len > SEV_FW_BLOB_MAX_SIZE:
                raise KernelError(E.EINVAL)
            blob, _ = self.host.kalloc(params.len)
            address, length = blob, params.len
        else:
            fields = {k: bytes(len(v)) for k, v in fields.items()}
        try:
            buf = bytearray(fw_struct.build(dict(handle=self._handle, address=address, len=length, **fields)))
            r = self._sev_issue(fwcmd, buf, cmd)
            if params.len:  # not a length query
                if r:
                    return r
                if blob is not None:
                    self.mem.uwrite(params.uaddr, self.host.dram.read(blob, params.len))
            params.len = fw_struct.parse(bytes(buf)).len
            self.mem.uwrite(cmd.data, kvm_struct.build(params))
            return r
        finally:
            if blob is not None:
                self.host.kfree(blob)

    def _op_launch_secret(self, cmd: Container) -> int:
        self._require_sev()
        params = self._data(cmd, KvmSevLaunchSecret)
        pages = self.mem.pin(params.guest_uaddr, params.guest_len)
        blobs = []
        try:
            if any(pages[j] != pages[0] + j * PAGE_SIZE for j in range(len(pages))):
                raise KernelError(E.EINVAL)  # the PSP writes one physically contiguous range
            trans = self.mem.copy_user_blob(params.trans_uaddr, params.trans_len)
            blobs.append(trans)
            hdr = self.mem.copy_user_blob(params.hdr_uaddr, params.hdr_len)
            blobs.append(hdr)
            buf = bytearray(SevDataLaunchSecret.build(dict(
                handle=self._handle, hdr_address=hdr, hdr_len=params.hdr_len,
                guest_address=pages[0] + (params.guest_uaddr & (PAGE_SIZE - 1)), guest_len=params.guest_len,
                trans_address=trans, trans_len=params.trans_len)))
            return self._sev_issue(FwCmd.LAUNCH_UPDATE_SECRET, buf, cmd)
        finally:
            for hpa in blobs:
                self.host.kfree(hpa)
            self.mem.unpin(pages)

    def _op_launch_finish(self, cmd: Container) -> int:
        self._require_sev()
        return self._sev_issue(FwCmd.LAUNCH_FINISH, bytearray(SevDataHandle.build(dict(handle=self._handle))), cmd)

    def _op_guest_status(self, cmd: Container) -> int:
        self._require_sev()
        buf = bytearray(SevDataGuestStatus.build(dict(handle=self._handle)))
        r = self._sev_issue(FwCmd.GUEST_STATUS, buf, cmd)
        if r:
            return r
        st = SevDataGuestStatus.parse(bytes(buf))
        self.mem.uwrite(cmd.data, KvmSevGuestStatus.build(dict(handle=st.handle, policy=st.policy, state=st.state)))
        return 0

    def _op_attestation(self, cmd: Container) -> int:
        self._require_sev()
        params = self._data(cmd, KvmSevAttestationReport)
        return self._blob_to_user(cmd, params, KvmSevAttestationReport, FwCmd.ATTESTATION_REPORT,
                                  SevDataAttestationReport, mnonce=bytes(params.mnonce))

    # -- vCPUs (SEV-ES) ----------------------------------------------------------------------------
    def create_vcpu(self, save_area: bytes) -> int:
        """KVM_CREATE_VCPU then KVM_SET_{REGS,SREGS,FPU,XCRS}: the VMM's reset state of a new vCPU, here given as the
        VMCB save area it becomes (what ``sev_es_sync_vmsa`` copies into the VMSA page). Returns its index."""
        if len(save_area) != VMSA_SIZE:
            raise ValueError("a vCPU's save area is one 4 KiB VMSA page")
        self.vcpus.append(_Vcpu(bytes(save_area)))
        return len(self.vcpus) - 1

    def _op_launch_update_vmsa(self, cmd: Container) -> int:
        """``sev_launch_update_vmsa``: for each vCPU in order, sync its state into its VMSA page and have the PSP
        encrypt and measure that page (LAUNCH_UPDATE_VMSA); from then on its state is protected."""
        self._require_sev()
        if not self._es:
            raise KernelError(E.ENOTTY)  # not an SEV-ES guest
        for vcpu in self.vcpus:
            if vcpu.vmsa_hpa is not None:
                continue  # already encrypted (a second call skips it, as vcpu->arch.guest_state_protected)
            hpa, page = self.host.kalloc(VMSA_SIZE)
            page[:] = vcpu.save_area
            buf = bytearray(SevDataLaunchUpdate.build(dict(handle=self._handle, address=hpa, len=VMSA_SIZE)))
            r = self._sev_issue(FwCmd.LAUNCH_UPDATE_VMSA, buf, cmd)
            if r:
                self.host.kfree(hpa)
                return r
            vcpu.vmsa_hpa = hpa
        return 0

    def _op_enotty(self, cmd: Container) -> int:
        raise KernelError(E.ENOTTY)  # LAUNCH_UPDATE_VMSA on a non-ES VM; SNP commands on a non-SNP VM

    def _op_einval(self, cmd: Container) -> int:
        raise KernelError(E.EINVAL)  # INIT2 on a KVM_X86_DEFAULT_VM

    _dispatch = {
        SevCmdId.INIT: _op_init,
        SevCmdId.ES_INIT: lambda self, cmd: self._op_init(cmd, es=True),
        SevCmdId.INIT2: _op_einval,
        SevCmdId.LAUNCH_START: _op_launch_start,
        SevCmdId.LAUNCH_UPDATE_DATA: _op_launch_update_data,
        SevCmdId.LAUNCH_UPDATE_VMSA: _op_launch_update_vmsa,
        SevCmdId.LAUNCH_SECRET: _op_launch_secret,
        SevCmdId.LAUNCH_MEASURE: _op_launch_measure,
        SevCmdId.LAUNCH_FINISH: _op_launch_finish,
        SevCmdId.GUEST_STATUS: _op_guest_status,
        SevCmdId.DBG_DECRYPT: lambda self, cmd: self._op_dbg(cmd, True),
        SevCmdId.DBG_ENCRYPT: lambda self, cmd: self._op_dbg(cmd, False),
        SevCmdId.GET_ATTESTATION_REPORT: _op_attestation,
        SevCmdId.SEND_START: MigrationOps._op_send_start,
        SevCmdId.SEND_UPDATE_DATA: lambda self, cmd: self._op_update_data(cmd, receive=False),
        SevCmdId.SEND_FINISH: lambda self, cmd: self._op_handle_only(cmd, FwCmd.SEND_FINISH),
        SevCmdId.SEND_CANCEL: lambda self, cmd: self._op_handle_only(cmd, FwCmd.SEND_CANCEL),
        SevCmdId.RECEIVE_START: MigrationOps._op_receive_start,
        SevCmdId.RECEIVE_UPDATE_DATA: lambda self, cmd: self._op_update_data(cmd, receive=True),
        SevCmdId.RECEIVE_FINISH: lambda self, cmd: self._op_handle_only(cmd, FwCmd.RECEIVE_FINISH),
        SevCmdId.SNP_LAUNCH_START: _op_enotty,
        SevCmdId.SNP_LAUNCH_UPDATE: _op_enotty,
        SevCmdId.SNP_LAUNCH_FINISH: _op_enotty,
        SevCmdId.SNP_ENABLE_REQ_CERTS: _op_enotty,
    }

