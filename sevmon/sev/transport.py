"""The kernel side, simulated: ``KVM_MEMORY_ENCRYPT_OP`` is the only way in.

(The same structs on real hardware: :mod:`sevmon.sev.linux`. Host physical memory:
:mod:`sevmon.sev.hostmem`.) :class:`SimulatedKvm` is one VM file descriptor in one VMM process on a
:class:`SimulatedHost`. It models Linux's *classic* ``arch/x86/kvm/svm/sev.c`` (v4.16 up to
the 2026 rewrite, with the Nov-2020 offset fix; sev-api.md §2.1) closely enough that round
trips, firmware calls, errno values, the ``error`` field and the known bugs come out as on
real hardware:

* one ioctl is one user->kernel round trip; the ``kvm_sev_cmd`` is copied back even on failure;
* DBG_{DE,EN}CRYPT split only at *source* page boundaries, one PSP command per chunk, a
  bounce page for unaligned decrypts, and a read-modify-write (two PSP commands) for
  unaligned encrypts — including bug (b): the RMW re-encrypts ``round_up(len, 16)`` bytes
  from the rounded-down destination, silently dropping bytes past that;
* bug (c) (an aligned chunk whose destination crosses a page writes past the single pinned
  destination page) is present but harmless here, because user buffers and guest RAM are
  physically contiguous in this model, so the "next physical page" is the next virtual one;
* errno: ``-ENOTTY`` not an SEV guest, ``-EINVAL`` bad arguments, ``-EFAULT`` bad user
  pointers, ``-ENOMEM`` pin failures, ``-EBADF`` no ``/dev/sev``, ``-EIO`` firmware errors.

Memory is modelled honestly as three address spaces: the process's virtual addresses (guest
RAM mapped at :data:`GUEST_HVA_BASE`, a heap for the VMM's buffers), host physical memory
(:class:`HostMemory`, which the PSP reads and writes), and guest physical addresses. The kernel
"pins" an HVA by translating it to a host physical page.

Choices where the model has to decide (documented, not guessed at silently):

* A guest frame absent from the sparse :class:`~sevmon.machine.ram.RAM` store is a hole in the
  VMM's mapping: pinning it fails, and Linux's ``sev_pin_memory`` turns any pin failure into
  ``-ENOMEM`` — so a debug read of a frame that is not RAM fails with ``ENOMEM`` instead of
  returning the garbage a real PSP would produce for a zero page.
* ``KVM_MEMORY_ENCRYPT_REG_REGION`` only does the bookkeeping (memlock accounting, region
  list); it does not fault in absent frames.
* Large aligned transfers are *counted* as one PSP command per source page but executed as one
  engine pass per physically contiguous run (see :meth:`SevFirmware.dbg_crypt`); fault
  injection splits the run at the failing command, so the outcome is the same as issuing them
  one by one.
* SEND_*/RECEIVE_* are dispatched like the kernel does but the firmware answers UNSUPPORTED.
* ``/dev/sev`` (``SEV_ISSUE_CMD``) serves PLATFORM_STATUS, PDH_CERT_EXPORT and GET_ID2, what
  QEMU uses; the other commands answer ``-EINVAL``.
* The host runs without SME, so the PSP gets plain host physical addresses (no C-bit).
"""

from __future__ import annotations

import errno as E
import os
import threading
from dataclasses import dataclass, fields

from construct import Container

from sevmon.machine.ram import RAM, MemoryAccessError

from .abi import (
    KVM_MEMORY_ENCRYPT_OP,
    KVM_MEMORY_ENCRYPT_REG_REGION,
    KVM_MEMORY_ENCRYPT_UNREG_REGION,
    PAGE_MASK,
    PAGE_SHIFT,
    PAGE_SIZE,
    SEV_FW_BLOB_MAX_SIZE,
    SEV_ISSUE_CMD,
    FwCmd,
    KvmEncRegion,
    KvmSevAttestationReport,
    KvmSevCmd,
    KvmSevDbg,
    KvmSevGuestStatus,
    KvmSevLaunchMeasure,
    KvmSevLaunchSecret,
    KvmSevLaunchStart,
    KvmSevLaunchUpdateData,
    PlatformState,
    SevCmdId,
    SevDataActivate,
    SevDataAttestationReport,
    SevDataGetId,
    SevDataGuestStatus,
    SevDataHandle,
    SevDataInit,
    SevDataLaunchSecret,
    SevDataLaunchStart,
    SevDataLaunchUpdate,
    SevDataPdhCertExport,
    SevIssueCmd,
    SevUserCmd,
    SevUserDataGetId2,
    SevUserDataPdhCertExport,
    SevUserDataStatus,
)
from .cpuid import SevCpuid
from .engine import MemoryController
from .firmware import SevFirmware
from .hostmem import HostMemory, _Extents

# Process virtual layout (x86-64 user space) and host physical zones.
GUEST_HVA_BASE = 0x7F00_0000_0000
HEAP_HVA_BASE = 0x5555_0000_0000
KERNEL_HPA_BASE = 0x0010_0000          # bounce pages and kernel copies of user blobs
USER_HPA_BASE = 0x0001_0000_0000       # pages backing the VMMs' heaps
GUEST_HPA_SPACING = 1 << 42            # guest RAM of VM slot k lives at (k + 1) << 42
_U64 = (1 << 64) - 1


class _Errno(Exception):
    """A negative errno travelling up from deep inside an ioctl handler."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


@dataclass
class KernelStats:
    """Cumulative counters of one VM's kernel. ``bytes_*`` are what the PSP processed for
    DBG_DECRYPT/DBG_ENCRYPT (firmware lengths, so 16-byte rounding and RMW reads count)."""

    round_trips: int = 0
    firmware_calls: int = 0
    bytes_decrypted: int = 0
    bytes_encrypted: int = 0

    def snapshot(self) -> KernelStats:
        return KernelStats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def __sub__(self, other: KernelStats) -> KernelStats:
        return KernelStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})


class SimulatedHost:
    """One machine: DRAM, the memory controller, the PSP, and KVM's global SEV state.

    Construction plays the ccp driver's probe (platform INIT, then WBINVD + DF_FLUSH), so the
    platform is INIT and every ASID clean, as on a booted host.
    """

    def __init__(self, *, cbitpos: int = 47, reduced_phys_bits: int = 1, max_asid: int = 509,
                 min_asid: int = 1, sev_enabled: bool = True):
        self.cpuid = SevCpuid.make(cbitpos=cbitpos, reduced_phys_bits=reduced_phys_bits,
                                   max_asid=max_asid, min_asid=min_asid)
        self.sev_enabled = sev_enabled
        self.dram = HostMemory()
        self.mc = MemoryController(self.dram)
        self.psp = SevFirmware(self.mc, max_asid=max_asid)
        self.psp.call(FwCmd.INIT, bytearray(SevDataInit.build({})))
        self.psp.call(FwCmd.DF_FLUSH)
        self._kernel_phys = _Extents(KERNEL_HPA_BASE, USER_HPA_BASE)
        self._user_phys = _Extents(USER_HPA_BASE, GUEST_HPA_SPACING)
        self._asid_used: set[int] = set()      # KVM sev_asid_bitmap
        self._asid_reclaim: set[int] = set()   # KVM sev_reclaim_asid_bitmap
        self._vm_slots = 0
        self._next_fd = 3
        self._psp_lock = threading.Lock()     # sev_cmd_mutex: one PSP command at a time, system-wide
        self._bitmap_lock = threading.Lock()  # sev_bitmap_lock
        self._phys_lock = threading.Lock()    # the page allocator

    @property
    def sev_es_enabled(self) -> bool:
        """KVM enables SEV-ES only when ASIDs below min_sev_asid exist."""
        return self.cpuid.min_sev_asid > 1 and self.cpuid.sev_es

    # physical allocation -----------------------------------------------------------------
    def kalloc(self, n: int) -> tuple[int, bytearray]:
        """A zeroed, physically contiguous kernel buffer (alloc_page / kzalloc)."""
        buf = bytearray(max(n, 1))
        with self._phys_lock:
            base = self._kernel_phys.alloc(len(buf), buf)
            self.dram.map(base, buf)
        return base, buf

    def kfree(self, base: int) -> None:
        with self._phys_lock:
            self._kernel_phys.remove(base)
            self.dram.unmap(base)

    def _user_pages(self, buf: bytearray) -> int:
        with self._phys_lock:
            base = self._user_phys.alloc(len(buf), buf)
            self.dram.map(base, buf)
        return base

    def _user_free(self, base: int) -> None:
        with self._phys_lock:
            self._user_phys.remove(base)
            self.dram.unmap(base)

    def _new_fd(self) -> int:
        with self._phys_lock:
            self._next_fd += 1
            return self._next_fd


class SimulatedKvm:
    """One VM fd (plus the process's ``/dev/sev`` fd) of a VMM process on a simulated host.

    The VMM-facing surface is what :class:`LinuxSevTransport` offers too: ``vm_fd``, ``sev_fd``,
    :meth:`ioctl`, process memory (:meth:`alloc`, :meth:`free`, :meth:`read`, :meth:`write`,
    :meth:`map_guest_ram`), :meth:`cpuid`, :meth:`close`; plus, in simulation only, the guest's
    own CPU accesses (:meth:`guest_store`, :meth:`guest_load`) and fault injection.
    """

    def __init__(self, host: SimulatedHost | None = None, *, memlock_limit: int | None = None):
        """``memlock_limit``: RLIMIT_MEMLOCK in bytes; None models CAP_IPC_LOCK (no limit)."""
        self.host = host if host is not None else SimulatedHost()
        self.vm_fd = self.host._new_fd()
        self.sev_fd = self.host._new_fd()
        self.stats = KernelStats()
        self.memlock_limit = memlock_limit
        self._heap = _Extents(HEAP_HVA_BASE, GUEST_HVA_BASE)  # hva -> (bytearray, hpa)
        self._ram: RAM | None = None
        self._guest_hpa = 0
        self._faults: dict[int, int] = {}
        # struct kvm_sev_info
        self._active = False
        self._asid = 0
        self._handle = 0
        self._fd: int | None = None
        self._policy = 0
        self._pages_locked = 0
        self._regions: list[tuple[int, int, int]] = []
        self._closed = False
        self._kvm_lock = threading.Lock()   # kvm->lock: one SEV command per VM at a time
        self._heap_lock = threading.Lock()  # the VMM's malloc

    # -- process memory (what the VMM does in its own address space) ------------------------
    def alloc(self, n: int) -> int:
        """malloc: a zeroed user buffer; returns its address (HVA)."""
        buf = bytearray((max(n, 1) + PAGE_SIZE - 1) & PAGE_MASK)
        hpa = self.host._user_pages(buf)
        with self._heap_lock:
            return self._heap.alloc(len(buf), (buf, hpa))

    def free(self, hva: int) -> None:
        with self._heap_lock:
            buf, hpa = self._heap.remove(hva)
        self.host._user_free(hpa)

    def read(self, hva: int, n: int) -> bytes:
        """Load ``n`` bytes of the process's memory (guest RAM reads back at rest)."""
        return self._uread(hva, n)

    def write(self, hva: int, data: bytes) -> None:
        """Store into the process's memory. A store into the guest RAM mapping faults the
        frames in (creates them), like touching anonymous memory."""
        if self._ram is not None and GUEST_HVA_BASE <= hva and hva + len(data) <= GUEST_HVA_BASE + self._ram.size:
            self._ram.write(hva - GUEST_HVA_BASE, data)
            return
        self._uwrite(hva, data)

    def map_guest_ram(self, ram: RAM) -> int:
        """mmap the guest's RAM into the process (as QEMU does for each RAM block); its pages
        get a fixed host physical home. Returns the HVA of guest physical address 0."""
        if self._ram is not None:
            raise RuntimeError("guest RAM is already mapped in this process")
        if ram.size > GUEST_HPA_SPACING:
            raise ValueError("guest RAM larger than 4 TiB is not supported by the simulated host")
        with self.host._phys_lock:
            self.host._vm_slots += 1
            self._guest_hpa = self.host._vm_slots * GUEST_HPA_SPACING
        self._ram = ram
        self.host.dram.map(self._guest_hpa, ram, ram.size)
        return GUEST_HVA_BASE

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
        self._pages_locked = 0
        if self._active:
            if self._handle:
                self._fw(FwCmd.DEACTIVATE, bytearray(SevDataHandle.build(dict(handle=self._handle))))
                self._fw(FwCmd.DECOMMISSION, bytearray(SevDataHandle.build(dict(handle=self._handle))))
            with self.host._bitmap_lock:
                self.host._asid_reclaim.add(self._asid)
            self._active = False
            self._asid = 0
        if self._ram is not None:
            self.host.dram.unmap(self._guest_hpa)
        for hva in list(self._heap._bases):
            self.free(hva)

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
        self.host.mc.write(self._guest_hpa + gpa, data, asid)

    def guest_load(self, gpa: int, n: int, *, c_bit: bool = True) -> bytes:
        """The guest's own CPU load; MemoryAccessError if a frame is not RAM."""
        ram = self._guest_ram(gpa, n)
        asid = self._cpu_asid(c_bit)
        for pfn in range(gpa >> PAGE_SHIFT, (gpa + n + PAGE_SIZE - 1) >> PAGE_SHIFT):
            if not ram.has(pfn):
                raise MemoryAccessError(max(gpa, pfn << PAGE_SHIFT))
        return self.host.mc.read(self._guest_hpa + gpa, n, asid)

    def _cpu_asid(self, c_bit: bool) -> int:
        if not c_bit:
            return 0
        if not self._asid or not self.host.mc.has_key(self._asid):
            raise LookupError("the guest has no memory encryption key (no LAUNCH_START/ACTIVATE yet)")
        return self._asid

    def _guest_ram(self, gpa: int, n: int) -> RAM:
        if self._ram is None or self._closed:
            raise LookupError("the VM has no guest RAM mapped (not set up, or closed)")
        if gpa < 0 or gpa + n > self._ram.size:
            raise MemoryAccessError(gpa)
        return self._ram

    # -- the ioctl entry point ---------------------------------------------------------------
    def ioctl(self, fd: int, request: int, arg: int = 0) -> int:
        """``ioctl(2)``: returns 0 or raises OSError(errno), like ``fcntl.ioctl``."""
        with self._kvm_lock:
            r = self._ioctl_locked(fd, request, arg)
        if r < 0:
            raise OSError(-r, os.strerror(-r))
        return r

    def _ioctl_locked(self, fd: int, request: int, arg: int) -> int:
        self.stats.round_trips += 1
        if self._closed or fd not in (self.vm_fd, self.sev_fd):
            r = -E.EBADF
        elif fd == self.vm_fd and request == KVM_MEMORY_ENCRYPT_OP:
            r = self._mem_enc_op(arg)
        elif fd == self.vm_fd and request == KVM_MEMORY_ENCRYPT_REG_REGION:
            r = self._region_ioctl(arg, register=True)
        elif fd == self.vm_fd and request == KVM_MEMORY_ENCRYPT_UNREG_REGION:
            r = self._region_ioctl(arg, register=False)
        elif fd == self.sev_fd and request == SEV_ISSUE_CMD:
            r = self._sev_dev_ioctl(arg)
        else:
            r = -E.ENOTTY
        return r

    # -- user memory access (copy_{from,to}_user, pinning) -----------------------------------
    def _translate(self, hva: int) -> tuple[bytearray | None, int, int] | None:
        """(bytearray or None for guest RAM, offset/hpa, bytes valid from here)."""
        if self._ram is not None and GUEST_HVA_BASE <= hva < GUEST_HVA_BASE + self._ram.size:
            gpa = hva - GUEST_HVA_BASE
            if not self._ram.has(gpa >> PAGE_SHIFT):
                return None
            return None, self._guest_hpa + gpa, PAGE_SIZE - (gpa & (PAGE_SIZE - 1))
        hit = self._heap.find(hva)
        if hit is None:
            return None
        base, size, (buf, hpa) = hit
        return buf, hva - base, base + size - hva

    def _uread(self, hva: int, n: int) -> bytes:
        t = self._translate(hva)
        if t is not None and t[2] >= n:  # the common case: one mapping, one copy
            buf, off, _ = t
            return bytes(memoryview(buf)[off:off + n]) if buf is not None else bytes(self.host.dram.read(off, n))
        out = bytearray()
        while n > 0:
            t = self._translate(hva)
            if t is None:
                raise _Errno(E.EFAULT)
            buf, off, avail = t
            take = min(n, avail)
            out += buf[off:off + take] if buf is not None else self.host.dram.read(off, take)
            hva += take
            n -= take
        return bytes(out)

    def _uwrite(self, hva: int, data: bytes) -> None:
        mv = memoryview(data)
        while len(mv):
            t = self._translate(hva)
            if t is None:
                raise _Errno(E.EFAULT)
            buf, off, avail = t
            take = min(len(mv), avail)
            if buf is not None:
                buf[off:off + take] = mv[:take]
            else:
                self.host.dram.write(off, mv[:take])
            hva += take
            mv = mv[take:]

    def _page_hpa(self, hva: int) -> int | None:
        t = self._translate(hva)
        if t is None:
            return None
        buf, off, _ = t
        if buf is None:
            return off
        return self._heap.find(hva)[2][1] + off

    def _pin(self, uaddr: int, ulen: int) -> list[int]:
        """``sev_pin_memory``: host physical addresses of the pages of ``[uaddr, uaddr+ulen)``."""
        if ulen == 0 or uaddr + ulen > _U64:
            raise _Errno(E.EINVAL)
        first, last = uaddr >> PAGE_SHIFT, (uaddr + ulen - 1) >> PAGE_SHIFT
        npages = last - first + 1
        self._charge(npages)
        pages = []
        for pfn in range(first, last + 1):
            hpa = self._page_hpa(pfn << PAGE_SHIFT)
            if hpa is None:  # pin_user_pages_fast fell short: sev_pin_memory says -ENOMEM
                raise _Errno(E.ENOMEM)
            pages.append(hpa)
        self._pages_locked += npages
        return pages

    def _charge(self, npages: int) -> None:
        if self.memlock_limit is not None and self._pages_locked + npages > self.memlock_limit >> PAGE_SHIFT:
            raise _Errno(E.ENOMEM)

    def _unpin(self, pages: list[int]) -> None:
        self._pages_locked -= len(pages)

    def _copy_user_blob(self, uaddr: int, n: int) -> tuple[int, bytearray]:
        """``psp_copy_user_blob``: a kernel copy of a user blob, for the PSP to read."""
        if not uaddr or n > SEV_FW_BLOB_MAX_SIZE:
            raise _Errno(E.EINVAL)
        data = self._uread(uaddr, n)
        hpa, buf = self.host.kalloc(n)
        buf[:n] = data
        return hpa, buf

    # -- PSP access ---------------------------------------------------------------------------
    def _fw(self, fwcmd: int, buf: bytearray, cmd: Container | None = None) -> int:
        """``__sev_do_cmd_locked``: one PSP command; ``cmd.error`` gets its status."""
        self.stats.firmware_calls += 1
        status = self._faults.pop(self.stats.firmware_calls, None)
        with self.host._psp_lock:
            if status is None:
                status = self.host.psp.call(fwcmd, buf)
            else:
                self.host.psp.commands += 1
        if cmd is not None:
            cmd.error = int(status)
        return -E.EIO if status else 0

    def _sev_issue(self, fwcmd: int, buf: bytearray, cmd: Container) -> int:
        """``sev_issue_cmd``: through the ``/dev/sev`` fd stored at LAUNCH_START."""
        if self._fd != self.sev_fd:
            raise _Errno(E.EBADF)
        return self._fw(fwcmd, buf, cmd)

    def _fw_dbg(self, cmd: Container, *, encrypt: bool, src: int, dst: int, length: int, calls: int = 1) -> None:
        """``calls`` back-to-back DBG commands, one per source-page chunk of the range."""
        base = self.stats.firmware_calls
        hits = [k for k in self._faults if base < k <= base + calls] if self._faults else ()
        if hits:
            k = min(hits)
            done = k - base - 1
            if done:  # the commands before the injected failure run normally
                prefix = min((src & PAGE_MASK) + done * PAGE_SIZE - src, length)
                self._fw_dbg(cmd, encrypt=encrypt, src=src, dst=dst, length=prefix, calls=done)
            self.stats.firmware_calls += 1
            with self.host._psp_lock:
                self.host.psp.commands += 1
            cmd.error = self._faults.pop(k)
            raise _Errno(E.EIO)
        with self.host._psp_lock:
            status = self.host.psp.dbg_crypt(encrypt=encrypt, handle=self._handle, src=src, dst=dst,
                                             length=length, commands=calls)
        cmd.error = int(status)
        if status:  # the first of them fails; the loop stops there
            self.stats.firmware_calls += 1
            raise _Errno(E.EIO)
        self.stats.firmware_calls += calls
        if encrypt:
            self.stats.bytes_encrypted += length
        else:
            self.stats.bytes_decrypted += length

    # -- /dev/sev --------------------------------------------------------------------------------
    def _sev_dev_ioctl(self, arg: int) -> int:
        """``sev_ioctl`` of the ccp driver: PLATFORM_STATUS, PDH_CERT_EXPORT and GET_ID2."""
        try:
            inp = SevIssueCmd.parse(self._uread(arg, SevIssueCmd.sizeof()))
        except _Errno:
            return -E.EFAULT
        if inp.cmd > SevUserCmd.MAX:
            return -E.EINVAL
        handler = {SevUserCmd.PLATFORM_STATUS: self._dev_platform_status,
                   SevUserCmd.PDH_CERT_EXPORT: self._dev_pdh_cert_export,
                   SevUserCmd.GET_ID2: self._dev_get_id2}.get(inp.cmd)
        if handler is None:
            return -E.EINVAL  # the other /dev/sev commands are not modelled
        try:
            r = handler(inp)
        except _Errno as e:
            r = -e.code
        try:
            self._uwrite(arg, SevIssueCmd.build(inp))
        except _Errno:
            r = -E.EFAULT
        return r

    def _dev_platform_status(self, inp: Container) -> int:
        buf = bytearray(SevUserDataStatus.sizeof())
        r = self._fw(FwCmd.PLATFORM_STATUS, buf, inp)
        if not r:
            self._uwrite(inp.data, bytes(buf))
        return r

    def _dev_platform_init(self, inp: Container) -> None:
        """``__sev_platform_init_locked`` when the driver finds the platform UNINIT."""
        if self.host.psp.state == PlatformState.UNINIT:
            if self._fw(FwCmd.INIT, bytearray(SevDataInit.build({})), inp) or \
                    self._fw(FwCmd.DF_FLUSH, bytearray(), inp):
                raise _Errno(E.EIO)

    def _dev_pdh_cert_export(self, inp: Container) -> int:
        p = SevUserDataPdhCertExport.parse(self._uread(inp.data, SevUserDataPdhCertExport.sizeof()))
        blobs = []
        try:
            pdh = chain = 0
            if p.pdh_cert_address and p.pdh_cert_len and p.cert_chain_address:  # else: a length query
                if p.pdh_cert_len > SEV_FW_BLOB_MAX_SIZE or p.cert_chain_len > SEV_FW_BLOB_MAX_SIZE:
                    raise _Errno(E.EFAULT)
                pdh = self.host.kalloc(p.pdh_cert_len)[0]
                blobs.append(pdh)
                chain = self.host.kalloc(p.cert_chain_len)[0]
                blobs.append(chain)
            self._dev_platform_init(inp)
            buf = bytearray(SevDataPdhCertExport.build(dict(
                pdh_cert_address=pdh, pdh_cert_len=p.pdh_cert_len if pdh else 0,
                cert_chain_address=chain, cert_chain_len=p.cert_chain_len if chain else 0)))
            r = self._fw(FwCmd.PDH_CERT_EXPORT, buf, inp)
            out = SevDataPdhCertExport.parse(bytes(buf))
            user = dict(p, pdh_cert_len=out.pdh_cert_len, cert_chain_len=out.cert_chain_len)
            self._uwrite(inp.data, SevUserDataPdhCertExport.build(user))
            if pdh:
                self._uwrite(p.pdh_cert_address, self.host.dram.read(pdh, out.pdh_cert_len))
                self._uwrite(p.cert_chain_address, self.host.dram.read(chain, out.cert_chain_len))
            return r
        finally:
            for hpa in blobs:
                self.host.kfree(hpa)

    def _dev_get_id2(self, inp: Container) -> int:
        p = SevUserDataGetId2.parse(self._uread(inp.data, SevUserDataGetId2.sizeof()))
        blob = 0
        if p.address and p.length:
            if p.length > PAGE_SIZE:
                raise _Errno(E.EINVAL)
            blob = self.host.kalloc(p.length)[0]
        try:
            buf = bytearray(SevDataGetId.build(dict(address=blob, len=p.length if blob else 0)))
            r = self._fw(FwCmd.GET_ID, buf, inp)
            n = SevDataGetId.parse(bytes(buf)).len
            self._uwrite(inp.data, SevUserDataGetId2.build(dict(p, length=n)))
            if blob and not r:
                self._uwrite(p.address, self.host.dram.read(blob, n))
            return r
        finally:
            if blob:
                self.host.kfree(blob)

    # -- KVM_MEMORY_ENCRYPT_{REG,UNREG}_REGION ------------------------------------------------
    def _region_ioctl(self, arg: int, *, register: bool) -> int:
        try:
            rg = KvmEncRegion.parse(self._uread(arg, KvmEncRegion.sizeof()))
        except _Errno:
            return -E.EFAULT
        if not self._active:
            return -E.ENOTTY
        if register:
            if rg.size == 0 or rg.addr + rg.size > _U64:
                return -E.EINVAL
            npages = ((rg.addr + rg.size - 1) >> PAGE_SHIFT) - (rg.addr >> PAGE_SHIFT) + 1
            try:
                self._charge(npages)
            except _Errno as e:
                return -e.code
            self._pages_locked += npages
            self._regions.append((rg.addr, rg.size, npages))
            return 0
        for i, (addr, size, npages) in enumerate(self._regions):
            if addr == rg.addr and size == rg.size:
                del self._regions[i]
                self._pages_locked -= npages
                return 0
        return -E.EINVAL

    # -- KVM_MEMORY_ENCRYPT_OP -------------------------------------------------------------------
    def _mem_enc_op(self, argp: int) -> int:
        if not self.host.sev_enabled:
            return -E.ENOTTY
        if not argp:
            return 0
        try:
            cmd = KvmSevCmd.parse(self._uread(argp, KvmSevCmd.sizeof()))
        except _Errno:
            return -E.EFAULT
        cid = cmd.id
        if cid == SevCmdId.ES_INIT and not self.host.sev_es_enabled:
            return -E.ENOTTY
        handler = self._dispatch.get(cid)
        if handler is None:
            return -E.EINVAL  # unknown or never-dispatched id: no copy back
        try:
            r = handler(self, cmd)
        except _Errno as e:
            r = -e.code
        try:
            self._uwrite(argp, KvmSevCmd.build(cmd))
        except _Errno:
            r = -E.EFAULT
        return r

    def _data(self, cmd: Container, struct) -> Container:
        return struct.parse(self._uread(cmd.data, struct.sizeof()))

    def _require_sev(self) -> None:
        if not self._active:
            raise _Errno(E.ENOTTY)

    def _op_init(self, cmd: Container) -> int:
        if self._active:
            raise _Errno(E.EINVAL)
        asid = self._asid_new(cmd)
        if self.host.psp.state == PlatformState.UNINIT:  # sev_platform_init: INIT + DF_FLUSH
            r = self._fw(FwCmd.INIT, bytearray(SevDataInit.build({})), cmd)
            if not r:
                r = self._fw(FwCmd.DF_FLUSH, bytearray(), cmd)
            if r:
                with self.host._bitmap_lock:
                    self.host._asid_reclaim.add(asid)
                return r
        self._active, self._asid = True, asid
        return 0

    def _asid_new(self, cmd: Container) -> int:
        cpuid = self.host.cpuid
        lo, hi = cpuid.min_sev_asid, cpuid.num_encrypted_guests
        if lo > hi:
            raise _Errno(E.ENOTTY)
        with self.host._bitmap_lock:
            return self._asid_new_locked(lo, hi)

    def _asid_new_locked(self, lo: int, hi: int) -> int:
        used = self.host._asid_used
        for retry in (True, False):
            asid = next((a for a in range(lo, hi + 1) if a not in used), None)
            if asid is not None:
                used.add(asid)
                return asid
            reclaim = self.host._asid_reclaim
            if retry and reclaim:  # sev_flush_asids: WBINVD + DF_FLUSH, then recycle
                if self._fw(FwCmd.DF_FLUSH, bytearray()):
                    break
                used -= reclaim
                reclaim.clear()
        raise _Errno(E.EBUSY)

    def _op_launch_start(self, cmd: Container) -> int:
        self._require_sev()
        params = self._data(cmd, KvmSevLaunchStart)
        self._policy = params.policy
        blobs = []
        try:
            dh_hpa = sess_hpa = 0
            if params.dh_uaddr:
                dh_hpa, _ = self._copy_user_blob(params.dh_uaddr, params.dh_len)
                blobs.append(dh_hpa)
            if params.session_uaddr:
                sess_hpa, _ = self._copy_user_blob(params.session_uaddr, params.session_len)
                blobs.append(sess_hpa)
            start = bytearray(SevDataLaunchStart.build(dict(
                handle=params.handle, policy=params.policy,
                dh_cert_address=dh_hpa, dh_cert_len=params.dh_len if dh_hpa else 0,
                session_address=sess_hpa, session_len=params.session_len if sess_hpa else 0)))
            if cmd.sev_fd != self.sev_fd:  # __sev_issue_cmd(argp->sev_fd): must be /dev/sev
                raise _Errno(E.EBADF)
            r = self._fw(FwCmd.LAUNCH_START, start, cmd)
            if r:
                return r
            handle = SevDataLaunchStart.parse(bytes(start)).handle
            r = self._fw(FwCmd.ACTIVATE, bytearray(SevDataActivate.build(dict(handle=handle, asid=self._asid))), cmd)
            if r:
                self._fw(FwCmd.DECOMMISSION, bytearray(SevDataHandle.build(dict(handle=handle))))
                return r
            params.handle = handle
            try:
                self._uwrite(cmd.data, KvmSevLaunchStart.build(params))
            except _Errno:
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
        pages = self._pin(vaddr, size)
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
            self._unpin(pages)

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
                raise _Errno(E.EINVAL)
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
                    self._uwrite(params.uaddr, self.host.dram.read(blob, params.len))
            params.len = fw_struct.parse(bytes(buf)).len
            self._uwrite(cmd.data, kvm_struct.build(params))
            return r
        finally:
            if blob is not None:
                self.host.kfree(blob)

    def _op_launch_secret(self, cmd: Container) -> int:
        self._require_sev()
        params = self._data(cmd, KvmSevLaunchSecret)
        pages = self._pin(params.guest_uaddr, params.guest_len)
        blobs = []
        try:
            if any(pages[j] != pages[0] + j * PAGE_SIZE for j in range(len(pages))):
                raise _Errno(E.EINVAL)  # the PSP writes one physically contiguous range
            trans, _ = self._copy_user_blob(params.trans_uaddr, params.trans_len)
            blobs.append(trans)
            hdr, _ = self._copy_user_blob(params.hdr_uaddr, params.hdr_len)
            blobs.append(hdr)
            buf = bytearray(SevDataLaunchSecret.build(dict(
                handle=self._handle, hdr_address=hdr, hdr_len=params.hdr_len,
                guest_address=pages[0] + (params.guest_uaddr & (PAGE_SIZE - 1)), guest_len=params.guest_len,
                trans_address=trans, trans_len=params.trans_len)))
            return self._sev_issue(FwCmd.LAUNCH_UPDATE_SECRET, buf, cmd)
        finally:
            for hpa in blobs:
                self.host.kfree(hpa)
            self._unpin(pages)

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
        self._uwrite(cmd.data, KvmSevGuestStatus.build(dict(handle=st.handle, policy=st.policy, state=st.state)))
        return 0

    def _op_attestation(self, cmd: Container) -> int:
        self._require_sev()
        params = self._data(cmd, KvmSevAttestationReport)
        return self._blob_to_user(cmd, params, KvmSevAttestationReport, FwCmd.ATTESTATION_REPORT,
                                  SevDataAttestationReport, mnonce=bytes(params.mnonce))

    def _op_unmodelled(self, cmd: Container) -> int:
        self._require_sev()
        fwcmd = {SevCmdId.SEND_START: FwCmd.SEND_START, SevCmdId.SEND_UPDATE_DATA: FwCmd.SEND_UPDATE_DATA,
                 SevCmdId.SEND_FINISH: FwCmd.SEND_FINISH, SevCmdId.SEND_CANCEL: FwCmd.SEND_CANCEL,
                 SevCmdId.RECEIVE_START: FwCmd.RECEIVE_START,
                 SevCmdId.RECEIVE_UPDATE_DATA: FwCmd.RECEIVE_UPDATE_DATA,
                 SevCmdId.RECEIVE_FINISH: FwCmd.RECEIVE_FINISH}[cmd.id]
        return self._sev_issue(fwcmd, bytearray(64), cmd)

    def _op_enotty(self, cmd: Container) -> int:
        raise _Errno(E.ENOTTY)  # LAUNCH_UPDATE_VMSA on a non-ES VM; SNP commands on a non-SNP VM

    def _op_einval(self, cmd: Container) -> int:
        raise _Errno(E.EINVAL)  # INIT2 on a KVM_X86_DEFAULT_VM

    # -- DBG_DECRYPT / DBG_ENCRYPT: sev_dbg_crypt, classic ----------------------------------------
    def _op_dbg(self, cmd: Container, dec: bool) -> int:
        self._require_sev()
        debug = self._data(cmd, KvmSevDbg)
        if not debug.len or debug.src_uaddr + debug.len > _U64:
            raise _Errno(E.EINVAL)
        if not debug.dst_uaddr:
            raise _Errno(E.EINVAL)
        vaddr, size, dst = debug.src_uaddr, debug.len, debug.dst_uaddr
        if not ((vaddr | dst | size) & 15):
            # Everything aligned: every chunk is one DBG command straight between the pinned
            # pages. When both ranges are pinnable and physically contiguous, issue them as one
            # run (still one command per source page) instead of walking page by page.
            s = self._contiguous(vaddr, size)
            d = self._contiguous(dst, size) if s is not None else None
            if d is not None and (s + size <= d or d + size <= s):  # disjoint: order cannot matter
                self._charge(2)
                calls = ((vaddr + size - 1) >> PAGE_SHIFT) - (vaddr >> PAGE_SHIFT) + 1
                self._fw_dbg(cmd, encrypt=not dec, src=s, dst=d, length=size, calls=calls)
                return 0
        end = vaddr + size
        run = None  # [src_pa, dst_pa, length, chunks]: adjacent aligned chunks not yet issued
        while vaddr < end:
            src_p = self._pin_page(vaddr & PAGE_MASK)
            dst_p = self._pin_page(dst & PAGE_MASK) if src_p is not None else None
            if src_p is None or dst_p is None:
                self._flush(cmd, run, not dec)
                raise _Errno(E.ENOMEM)
            s_off, d_off = vaddr & (PAGE_SIZE - 1), dst & (PAGE_SIZE - 1)
            n = min(PAGE_SIZE - s_off, size)
            spa, dpa = src_p + s_off, dst_p + d_off
            if not ((spa | dpa | n) & 15):  # one DBG command straight between the two pages
                if (run is not None and run[0] + run[2] == spa and run[1] + run[2] == dpa
                        and (spa + n <= run[1] or dpa + n <= run[0])):  # adjacent, and no overlap
                    run[2] += n
                    run[3] += 1
                else:
                    self._flush(cmd, run, not dec)
                    run = [spa, dpa, n, 1]
            else:
                self._flush(cmd, run, not dec)
                run = None
                if dec:
                    self._dbg_decrypt_user(cmd, spa, dst, n)
                else:
                    self._dbg_encrypt_user(cmd, spa, vaddr, dpa, dst, n)
            vaddr += n
            dst += n
            size -= n
        self._flush(cmd, run, not dec)
        return 0

    def _contiguous(self, hva: int, n: int) -> int | None:
        """The host physical address of ``[hva, hva+n)`` if all of it is pinnable and
        physically contiguous (one guest RAM window or one heap buffer), else None."""
        if self._ram is not None and GUEST_HVA_BASE <= hva and hva + n <= GUEST_HVA_BASE + self._ram.size:
            gpa = hva - GUEST_HVA_BASE
            has = self._ram.has
            if all(has(p) for p in range(gpa >> PAGE_SHIFT, ((gpa + n - 1) >> PAGE_SHIFT) + 1)):
                return self._guest_hpa + gpa
            return None
        hit = self._heap.find(hva)
        if hit is not None and hva + n <= hit[0] + hit[1]:
            return hit[2][1] + (hva - hit[0])
        return None

    def _pin_page(self, hva: int) -> int | None:
        """Pin one page for the duration of a chunk (memlock is checked; nothing stays held)."""
        self._charge(2)
        return self._page_hpa(hva)

    def _flush(self, cmd: Container, run: list | None, encrypt: bool) -> None:
        if run is not None:
            self._fw_dbg(cmd, encrypt=encrypt, src=run[0], dst=run[1], length=run[2], calls=run[3])

    def _dbg_decrypt_user(self, cmd: Container, paddr: int, dst_uaddr: int, size: int) -> None:
        """Unaligned decrypt: DBG_DECRYPT the covering 16-byte blocks into a bounce page."""
        tpage, tbuf = self.host.kalloc(PAGE_SIZE)
        try:
            offset = paddr & 15
            self._fw_dbg(cmd, encrypt=False, src=paddr - offset, dst=tpage,
                         length=(size + offset + 15) & ~15)
            self._uwrite(dst_uaddr, bytes(tbuf[offset:offset + size]))
        finally:
            self.host.kfree(tpage)

    def _dbg_encrypt_user(self, cmd: Container, paddr: int, vaddr: int, dst_paddr: int,
                          dst_vaddr: int, size: int) -> None:
        """Unaligned encrypt: bounce the source, and read-modify-write the destination."""
        src_tpage = dst_tpage = None
        try:
            length = size
            if vaddr & 15:
                src_tpage, sbuf = self.host.kalloc(PAGE_SIZE)
                sbuf[:size] = self._uread(vaddr, size)
                paddr = src_tpage
            if dst_vaddr & 15 or size & 15:
                dst_tpage, dbuf = self.host.kalloc(PAGE_SIZE)
                offset = dst_paddr & 15
                self._fw_dbg(cmd, encrypt=False, src=dst_paddr - offset, dst=dst_tpage,
                             length=(size + offset + 15) & ~15)
                src_bytes = sbuf[:size] if src_tpage is not None else self._uread(vaddr, size)
                dbuf[offset:offset + size] = src_bytes
                paddr = dst_tpage
                dst_paddr -= offset
                length = (size + 15) & ~15  # classic bug (b): ignores the destination offset
            self._fw_dbg(cmd, encrypt=True, src=paddr, dst=dst_paddr, length=length)
        finally:
            for hpa in (src_tpage, dst_tpage):
                if hpa is not None:
                    self.host.kfree(hpa)

    _dispatch = {
        SevCmdId.INIT: _op_init,
        SevCmdId.ES_INIT: _op_init,
        SevCmdId.INIT2: _op_einval,
        SevCmdId.LAUNCH_START: _op_launch_start,
        SevCmdId.LAUNCH_UPDATE_DATA: _op_launch_update_data,
        SevCmdId.LAUNCH_UPDATE_VMSA: _op_enotty,
        SevCmdId.LAUNCH_SECRET: _op_launch_secret,
        SevCmdId.LAUNCH_MEASURE: _op_launch_measure,
        SevCmdId.LAUNCH_FINISH: _op_launch_finish,
        SevCmdId.GUEST_STATUS: _op_guest_status,
        SevCmdId.DBG_DECRYPT: lambda self, cmd: self._op_dbg(cmd, True),
        SevCmdId.DBG_ENCRYPT: lambda self, cmd: self._op_dbg(cmd, False),
        SevCmdId.GET_ATTESTATION_REPORT: _op_attestation,
        SevCmdId.SEND_START: _op_unmodelled,
        SevCmdId.SEND_UPDATE_DATA: _op_unmodelled,
        SevCmdId.SEND_FINISH: _op_unmodelled,
        SevCmdId.SEND_CANCEL: _op_unmodelled,
        SevCmdId.RECEIVE_START: _op_unmodelled,
        SevCmdId.RECEIVE_UPDATE_DATA: _op_unmodelled,
        SevCmdId.RECEIVE_FINISH: _op_unmodelled,
        SevCmdId.SNP_LAUNCH_START: _op_enotty,
        SevCmdId.SNP_LAUNCH_UPDATE: _op_enotty,
        SevCmdId.SNP_LAUNCH_FINISH: _op_enotty,
        SevCmdId.SNP_ENABLE_REQ_CERTS: _op_enotty,
    }

    # --- migration (SEND_* / RECEIVE_*): sevmon.sev.kvm_migration, one block to move -------
    from .kvm_migration import install as _install_migration_ops
    _install_migration_ops(_dispatch)
    del _install_migration_ops
    # --- end of migration block ------------------------------------------------------------

