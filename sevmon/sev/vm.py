"""The VMM side of SEV: what QEMU's ``target/i386/sev.c`` does, and all the rest of sevmon uses.

Everything goes through the kernel object's ``ioctl`` with packed structs in the process's
own memory, so the same code drives :class:`~sevmon.model.sim_kvm.SimulatedKvm` and
:class:`~sevmon.sev.linux.LinuxSevTransport`. Debug accesses are exactly one
``KVM_SEV_DBG_*`` ioctl each: round trips are the cost the monitor's page cache minimises.
"""

from __future__ import annotations

import contextlib
import errno as E
import os

from sevmon.memory.ram import PAGE_SHIFT, PAGE_SIZE, GuestRAM

from .abi import (
    KVM_MEMORY_ENCRYPT_OP,
    KVM_MEMORY_ENCRYPT_REG_REGION,
    MEASUREMENT_LEN,
    SEV_ISSUE_CMD,
    SEV_STATE_NAMES,
    GuestState,
    KvmEncRegion,
    KvmSevAttestationReport,
    KvmSevCmd,
    KvmSevDbg,
    KvmSevGuestStatus,
    KvmSevLaunchMeasure,
    KvmSevLaunchSecret,
    KvmSevLaunchStart,
    KvmSevLaunchUpdateData,
    Policy,
    SevCmdId,
    SevIssueCmd,
    SevRet,
    SevUserCmd,
    SevUserDataGetId2,
    SevUserDataPdhCertExport,
    SevUserDataStatus,
    fw_error_to_str,
)
from .cpuid import SevCpuid
from .stats import KernelStats
from .transport import KernelTransport

_U32 = 0xFFFF_FFFF


class SevError(Exception):
    """An SEV operation failed. ``errno`` is the ioctl's errno (0: refused by the VMM before
    any ioctl), ``fw_error`` the firmware status when the PSP failed it (errno EIO)."""

    def __init__(self, message: str, *, errno: int = 0, fw_error: int | None = None, gpa: int | None = None):
        super().__init__(message)
        self.errno = errno
        self.fw_error = fw_error
        self.gpa = gpa  # set when the failure is a guest frame that is not RAM


class SevVm:
    """One SEV guest as the VMM sees it."""

    def __init__(self, ram: GuestRAM, *, kernel: KernelTransport, policy: int = 0, cbitpos: int = 47,
                 reduced_phys_bits: int = 1,
                 dh_cert: bytes | None = None, session: bytes | None = None):
        """Open the SEV context like QEMU's ``sev_kvm_init``: check the C-bit against the host,
        read the platform version (``SEV_PLATFORM_STATUS`` on ``/dev/sev``), ``KVM_SEV_INIT``,
        map guest RAM and register it (``KVM_MEMORY_ENCRYPT_REG_REGION``).

        ``kernel``: the kernel transport, a ``LinuxSevTransport`` on real hardware or the model's ``SimulatedKvm``
        (several on one ``SimulatedHost`` put several guests on one platform); its CPUID must report ``cbitpos``.

        ``dh_cert``/``session``: the guest owner's ``dh-cert-file``/``session-file`` contents
        (decoded), given to LAUNCH_START as QEMU does.
        """
        self.kernel = kernel
        self.ram = ram
        self.policy = policy
        self.es = bool(policy & Policy.ES)  #: an SEV-ES guest: KVM_SEV_ES_INIT, vCPU state in encrypted VMSAs
        self.cpuid: SevCpuid = kernel.cpuid()
        if cbitpos != self.cpuid.cbitpos:
            raise SevError(f"SEV: cbitpos check failed, host '{self.cpuid.cbitpos}' requested '{cbitpos}'",
                           errno=E.EINVAL)
        if reduced_phys_bits < 1:
            raise SevError(f"SEV: reduced_phys_bits check failed, it should be >=1, requested '{reduced_phys_bits}'",
                           errno=E.EINVAL)
        self.reduced_phys_bits = reduced_phys_bits
        self.dh_cert, self.session = dh_cert, session
        self.handle = 0
        self.measurement: bytes | None = None
        self._state = GuestState.UNINIT
        self.api_major, self.api_minor, self.build_id = self._platform_status()
        self._op(SevCmdId.ES_INIT if self.es else SevCmdId.INIT, "ES_INIT" if self.es else "INIT")
        self._ram_hva = kernel.map_guest_ram(ram)
        self._ioctl_struct(KVM_MEMORY_ENCRYPT_REG_REGION, KvmEncRegion,
                           dict(addr=self._ram_hva, size=ram.size), "REG_REGION")

    # -- read-only facts ----------------------------------------------------------------------
    @property
    def me_mask(self) -> int:
        return self.cpuid.me_mask

    @property
    def state_name(self) -> str:
        """QEMU's ``SevState`` name, as ``query-sev`` reports it."""
        return SEV_STATE_NAMES.get(self._state, "uninit")

    @property
    def state_number(self) -> int:
        """QEMU's ``SevState`` value (printed by "Not in correct state. (LSECRET) %x")."""
        return int(self._state)

    @property
    def stats(self) -> KernelStats:
        """A snapshot of the kernel's cumulative counters (subtract two for a delta)."""
        return self.kernel.stats.snapshot()

    # -- launch ---------------------------------------------------------------------------------
    def launch(self, images: list[tuple[int, bytes]], vmsas: list[bytes] = ()) -> bytes:
        """LAUNCH_START(policy) -> LAUNCH_UPDATE_DATA over each (gpa, plaintext) image in order
        (writing plaintext into RAM first, then encrypt in place via the ioctl, as QEMU does with
        the BIOS/pflash) -> for an SEV-ES guest, one vCPU per VMSA in ``vmsas`` (BSP first) and
        LAUNCH_UPDATE_VMSA (QEMU 7.2's ``sev_launch_get_measure``, before measuring) -> LAUNCH_MEASURE
        (stored; returns the 48-byte blob). Leaves the guest in launch-secret."""
        if self.es and not vmsas:
            raise SevError("SEV: an SEV-ES guest needs at least one vCPU", errno=E.EINVAL)
        if self._state != GuestState.UNINIT:
            raise SevError(f"SEV: launch already started (state {self.state_name})")
        out = self._launch_start()
        self.handle = out.handle
        self._state = GuestState.LUPDATE
        for gpa, image in images:
            if not image:
                continue
            if gpa < 0 or gpa + len(image) > self.ram.size:
                raise SevError(f"SEV: image at {gpa:#x} (+{len(image):#x}) is outside guest RAM", errno=E.EINVAL,
                               gpa=gpa)
            self.kernel.write(self._ram_hva + gpa, image)  # plaintext, through the VMM's own mapping
            self._op(SevCmdId.LAUNCH_UPDATE_DATA, "LAUNCH_UPDATE_DATA", KvmSevLaunchUpdateData,
                     dict(uaddr=self._ram_hva + gpa, len=len(image)), span=(gpa, len(image)))
        if self.es:
            for vmsa in vmsas:
                self.kernel.create_vcpu(vmsa)
            self._op(SevCmdId.LAUNCH_UPDATE_VMSA, "LAUNCH_UPDATE_VMSA")
        # QEMU asks for the length first (the PSP answers INVALID_LEN and 48), then measures.
        probe = self._op(SevCmdId.LAUNCH_MEASURE, "LAUNCH_MEASURE", KvmSevLaunchMeasure, dict(uaddr=0, len=0),
                         check=False)
        need = probe.len or MEASUREMENT_LEN
        blob_hva = self.kernel.alloc(need)
        try:
            self._op(SevCmdId.LAUNCH_MEASURE, "LAUNCH_MEASURE", KvmSevLaunchMeasure, dict(uaddr=blob_hva, len=need))
            self.measurement = self.kernel.read(blob_hva, MEASUREMENT_LEN)
        finally:
            self.kernel.free(blob_hva)
        self._state = GuestState.LSECRET
        return self.measurement

    def _launch_start(self):
        """LAUNCH_START as QEMU's ``sev_launch_start``: the owner's session and DH certificate,
        when given, travel in process buffers; a failure is QEMU's one line."""
        k = self.kernel
        bufs, start = [], dict(handle=0, policy=self.policy)
        try:
            for blob, addr, length in ((self.session, "session_uaddr", "session_len"),
                                       (self.dh_cert, "dh_uaddr", "dh_len")):
                if blob is not None:
                    hva = k.alloc(len(blob))
                    bufs.append(hva)
                    k.write(hva, blob)
                    start.update({addr: hva, length: len(blob)})
            return self._op(SevCmdId.LAUNCH_START, "LAUNCH_START", KvmSevLaunchStart, start)
        except SevError as e:
            fw = e.fw_error if e.fw_error is not None else 0
            raise SevError(f"sev_launch_start: LAUNCH_START ret=-1 fw_error={fw} '{fw_error_to_str(fw)}'",
                           errno=e.errno, fw_error=e.fw_error) from None
        finally:
            for hva in bufs:
                k.free(hva)

    def inject_launch_secret(self, header: bytes, secret: bytes, gpa: int) -> None:
        """LAUNCH_SECRET (QMP ``sev-inject-launch-secret``): the PSP checks the packet's MAC
        with the TIK, decrypts with the TEK and writes the secret with the guest's key.

        Guest frames under ``[gpa, gpa+len)`` that were never touched are faulted in (as the
        kernel does when pinning anonymous memory) so a secret area outside the images works.
        """
        if self._state != GuestState.LSECRET:
            raise SevError(f"SEV: Not in correct state. (LSECRET) {int(self._state):x}")
        if gpa < 0 or gpa + len(secret) > self.ram.size:
            raise SevError(f"SEV: Failed to calculate HVA for GPA {gpa:#x}", errno=E.EFAULT, gpa=gpa)
        faulted = [pfn for pfn in range(gpa >> PAGE_SHIFT, ((gpa + max(len(secret), 1) - 1) >> PAGE_SHIFT) + 1)
                   if not self.ram.stored(pfn)]
        for pfn in faulted:
            self.ram.ensure(pfn)
        hdr_hva = self.kernel.alloc(len(header))
        trans_hva = self.kernel.alloc(len(secret))
        try:
            self.kernel.write(hdr_hva, header)
            self.kernel.write(trans_hva, secret)
            self._op(SevCmdId.LAUNCH_SECRET, "LAUNCH_SECRET", KvmSevLaunchSecret, dict(
                hdr_uaddr=hdr_hva, hdr_len=len(header), guest_uaddr=self._ram_hva + gpa,
                guest_len=len(secret), trans_uaddr=trans_hva, trans_len=len(secret)))
        except SevError:
            for pfn in faulted:  # refused (e.g. a wrong MAC): the guest's memory is as it was
                self.ram.drop(pfn)
            raise
        finally:
            self.kernel.free(hdr_hva)
            self.kernel.free(trans_hva)

    def finish(self) -> None:
        """LAUNCH_FINISH (QEMU does it on the first transition to running): the guest runs."""
        if self._state != GuestState.LSECRET:
            raise SevError(f"SEV: cannot finish the launch in state {self.state_name}")
        self._op(SevCmdId.LAUNCH_FINISH, "LAUNCH_FINISH")
        self._state = GuestState.RUNNING

    def guest_status(self) -> tuple[int, int, int]:
        """(handle, policy, state) from KVM_SEV_GUEST_STATUS, i.e. what the firmware says."""
        st = self._op(SevCmdId.GUEST_STATUS, "GUEST_STATUS", KvmSevGuestStatus, {})
        return st.handle, st.policy, st.state

    def attestation_report(self, mnonce: bytes) -> bytes:
        """KVM_SEV_GET_ATTESTATION_REPORT (QMP ``query-sev-attestation-report``)."""
        if len(mnonce) != 16:
            raise SevError("SEV: mnonce must be 16 bytes", errno=E.EINVAL)
        probe = self._op(SevCmdId.GET_ATTESTATION_REPORT, "GET_ATTESTATION_REPORT", KvmSevAttestationReport,
                         dict(mnonce=mnonce, uaddr=0, len=0), check=False)
        if not probe.len:
            raise SevError("SEV: Failed to query the attestation report length", errno=E.EIO)
        hva = self.kernel.alloc(probe.len)
        try:
            out = self._op(SevCmdId.GET_ATTESTATION_REPORT, "GET_ATTESTATION_REPORT", KvmSevAttestationReport,
                           dict(mnonce=mnonce, uaddr=hva, len=probe.len))
            return self.kernel.read(hva, out.len)
        finally:
            self.kernel.free(hva)

    def platform_certificates(self) -> tuple[bytes, bytes, bytes]:
        """(PDH cert, cert chain PEK||OCA||CEK, chip id) for ``query-sev-capabilities``: QEMU's
        ``sev_get_pdh_info`` + ``sev_get_cpu0_id``, each a length query then the real call."""
        lens = self._sev_dev(SevUserCmd.PDH_CERT_EXPORT, "PDH_CERT_EXPORT", SevUserDataPdhCertExport, {})
        pdh, chain = self.kernel.alloc(lens.pdh_cert_len), self.kernel.alloc(lens.cert_chain_len)
        try:
            out = self._sev_dev(SevUserCmd.PDH_CERT_EXPORT, "PDH_CERT_EXPORT", SevUserDataPdhCertExport, dict(
                pdh_cert_address=pdh, pdh_cert_len=lens.pdh_cert_len,
                cert_chain_address=chain, cert_chain_len=lens.cert_chain_len), check=True)
            certs = self.kernel.read(pdh, out.pdh_cert_len), self.kernel.read(chain, out.cert_chain_len)
        finally:
            self.kernel.free(pdh)
            self.kernel.free(chain)
        need = self._sev_dev(SevUserCmd.GET_ID2, "GET_ID2", SevUserDataGetId2, {}).length
        buf = self.kernel.alloc(need)
        try:
            out = self._sev_dev(SevUserCmd.GET_ID2, "GET_ID2", SevUserDataGetId2, dict(address=buf, length=need),
                                check=True)
            chip_id = self.kernel.read(buf, out.length)
        finally:
            self.kernel.free(buf)
        return certs[0], certs[1], chip_id

    # -- debug access -----------------------------------------------------------------------------
    def dbg_decrypt(self, gpa: int, length: int) -> bytes:
        """Plaintext of guest memory: exactly one KVM_SEV_DBG_DECRYPT ioctl (any alignment).
        A zero length returns b"" without a round trip.

        The destination sits at the same offset within its page as the source (see :meth:`_dbg_buffer`)."""
        if length == 0:
            return b""
        self._check_span(gpa, length)
        base, buf = self._dbg_buffer(gpa, length)
        try:
            self._op(SevCmdId.DBG_DECRYPT, "DBG_DECRYPT", KvmSevDbg,
                     dict(src_uaddr=self._hva(gpa), dst_uaddr=buf, len=length), span=(gpa, length))
            return self.kernel.read(buf, length)
        finally:
            self.kernel.free(base)

    def dbg_encrypt(self, gpa: int, data: bytes) -> None:
        """Write plaintext into guest memory with its key, exactly, on every released kernel; all or nothing.

        Released kernels' ``__sev_dbg_encrypt_user`` mishandle anything but one shape of request (sev-api.md §2.1):
        an unaligned destination or length is read-modify-written with ``round_up(len, 16)`` bytes from the
        rounded-down destination, silently dropping the last bytes (bug (b)); a chunk is cut only at *source* page
        boundaries, so a destination at a larger page offset makes the PSP write past the pinned page (bug (c)).
        So sevmon asks only for that one shape: 16-byte aligned, source and destination at the same page offset,
        within one page on both sides, one KVM_SEV_DBG_ENCRYPT ioctl per page. The partial 16-byte blocks at
        either end are read first (one DBG_DECRYPT over the aligned span) and merged here, sevmon's own
        read-modify-write. The same read keeps what was there: if a page fails, the pages already written get
        their old plaintext back, so a failed write leaves the guest as it was (the error is the first failure's).
        A single aligned page needs no read.
        """
        if not data:
            return
        self._check_span(gpa, len(data))
        lo, hi = gpa & ~15, (gpa + len(data) + 15) & ~15
        multi_page = (lo >> PAGE_SHIFT) != ((hi - 1) >> PAGE_SHIFT)
        if (gpa | len(data)) & 15 or multi_page:
            old = self.dbg_decrypt(lo, hi - lo)
            new = old[:gpa - lo] + bytes(data) + old[gpa - lo + len(data):]
        else:
            old, new = None, bytes(data)
        done = []
        try:
            a = lo
            while a < hi:
                n = min(hi - a, PAGE_SIZE - (a & (PAGE_SIZE - 1)))
                self._dbg_encrypt_page(a, new[a - lo:a - lo + n])
                done.append((a, n))
                a += n
        except SevError:
            for a, n in reversed(done):
                with contextlib.suppress(SevError):
                    self._dbg_encrypt_page(a, old[a - lo:a - lo + n])
            raise

    def _dbg_encrypt_page(self, gpa: int, data: bytes) -> None:
        """One KVM_SEV_DBG_ENCRYPT of 16-byte aligned ``data`` within one guest page, from a buffer at the same
        page offset: the one request shape every released kernel executes exactly and inside its pinned pages."""
        base, buf = self._dbg_buffer(gpa, len(data))
        try:
            self.kernel.write(buf, data)
            self._op(SevCmdId.DBG_ENCRYPT, "DBG_ENCRYPT", KvmSevDbg,
                     dict(src_uaddr=buf, dst_uaddr=self._hva(gpa), len=len(data)), span=(gpa, len(data)))
        finally:
            self.kernel.free(base)

    def _scratch(self, n: int) -> int:
        """A user buffer for one ioctl's argument struct (at most a page; the caller writes all of it), taken from
        this VM's pool and given back after the call: QEMU keeps these on its stack, and a buffer per call would
        cost the simulated platform more than the DBG command itself."""
        if n > PAGE_SIZE:
            raise ValueError("an ioctl argument struct is at most a page")
        try:
            return self.__dict__.setdefault("_scratch_pool", []).pop()
        except IndexError:
            return self.kernel.alloc(PAGE_SIZE)

    def _scratch_done(self, hva: int) -> None:
        self.__dict__.setdefault("_scratch_pool", []).append(hva)

    def _hva(self, gpa: int) -> int:
        """Where guest physical ``gpa`` is mapped in this process (one linear mapping of guest RAM)."""
        return self._ram_hva + gpa

    def _dbg_buffer(self, gpa: int, length: int) -> tuple[int, int]:
        """A page-aligned user buffer and the address in it at ``gpa``'s offset within its page.

        Linux's classic ``sev_dbg_crypt`` cuts a request only at *source* page boundaries and pins a single
        destination page per chunk, so an aligned chunk whose destination crosses a page makes the PSP write
        into whatever physical page follows (sev-api.md §2.1 bug (c): host memory corruption). With the
        destination at the source's page offset, every chunk's destination ends where its source page ends.
        """
        off = self._hva(gpa) & (PAGE_SIZE - 1)
        base = self.kernel.alloc(off + length)
        return base, base + off

    # -- the guest's own CPU (simulation only) ---------------------------------------------------
    def guest_write(self, gpa: int, data: bytes, private: bool = True) -> None:
        """A store by the guest itself: C-bit=1 goes through its key, C-bit=0 is shared plaintext.
        Models the memory controller: no ioctl, no PSP command, not counted."""
        try:
            self.kernel.guest_store(gpa, data, c_bit=private)
        except LookupError as e:
            raise SevError(f"SEV: guest write at {gpa:#x} impossible: {e}") from None

    def guest_zero_page(self, gpa: int) -> bytes:
        """The bytes at rest of a page of zeros the guest wrote privately at ``gpa`` (the RAM store's ``blank``
        for a guest whose every frame is RAM). Simulated kernel only: it models the memory controller."""
        return self.kernel.guest_zero_page(gpa)

    def guest_read(self, gpa: int, n: int, private: bool = True) -> bytes:
        """A load by the guest itself (see :meth:`guest_write`)."""
        try:
            return self.kernel.guest_load(gpa, n, c_bit=private)
        except LookupError as e:
            raise SevError(f"SEV: guest read at {gpa:#x} impossible: {e}") from None

    def close(self) -> None:
        """Close the VM (KVM deactivates and decommissions the guest, frees the ASID)."""
        self.kernel.close()

    # -- plumbing ---------------------------------------------------------------------------------
    def _check_span(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0:
            raise ValueError("negative guest address or length")
        if length > _U32:
            raise ValueError("a single debug access is limited to 4 GiB - 1 (kvm_sev_dbg.len is u32)")

    def _first_hole(self, gpa: int, length: int) -> int | None:
        """The first guest address of ``[gpa, gpa+length)`` that is not RAM, if any."""
        limit = self.ram.size >> PAGE_SHIFT
        for pfn in range(gpa >> PAGE_SHIFT, ((gpa + length - 1) >> PAGE_SHIFT) + 1):
            if pfn >= limit or not self.ram.has(pfn):
                return max(gpa, pfn << PAGE_SHIFT)
        return None

    def _platform_status(self) -> tuple[int, int, int]:
        st = self._sev_dev(SevUserCmd.PLATFORM_STATUS, "PLATFORM_STATUS", SevUserDataStatus, {}, check=True)
        return st.api_major, st.api_minor, st.build

    def _sev_dev(self, cmd: int, what: str, struct, values: dict, *, check: bool = False):
        """One ``SEV_ISSUE_CMD`` on ``/dev/sev``. Without ``check`` an INVALID_LEN answer is
        expected (a length query) and anything else fails."""
        k = self.kernel
        data = k.alloc(struct.sizeof())
        inp = k.alloc(SevIssueCmd.sizeof())
        try:
            k.write(data, struct.build(values))
            k.write(inp, SevIssueCmd.build(dict(cmd=cmd, data=data)))
            err = 0
            try:
                k.ioctl(k.sev_fd, SEV_ISSUE_CMD, inp)
            except OSError as e:
                err = e.errno
            fw = SevIssueCmd.parse(k.read(inp, SevIssueCmd.sizeof())).error
            out = struct.parse(k.read(data, struct.sizeof()))
        finally:
            k.free(data)
            k.free(inp)
        if err and (check or err != E.EIO or fw != SevRet.INVALID_LEN):
            raise self._error(what, err, fw if err == E.EIO else None)
        return out

    def _ioctl_struct(self, request: int, struct, values: dict, what: str) -> None:
        k = self.kernel
        hva = k.alloc(struct.sizeof())
        try:
            k.write(hva, struct.build(values))
            try:
                k.ioctl(k.vm_fd, request, hva)
            except OSError as e:
                raise self._error(what, e.errno, None) from None
        finally:
            k.free(hva)

    def _op(self, cmd_id: int, what: str, struct=None, values: dict | None = None, *,
            check: bool = True, span: tuple[int, int] | None = None):
        """One KVM_MEMORY_ENCRYPT_OP round trip; returns the per-command struct as copied back."""
        k = self.kernel
        data = 0
        if struct is not None:
            data = self._scratch(struct.sizeof())
            k.write(data, struct.build(values or {}))
        cmd = self._scratch(KvmSevCmd.sizeof())
        try:
            k.write(cmd, KvmSevCmd.build(dict(id=cmd_id, data=data, sev_fd=k.sev_fd)))
            err = 0
            try:
                k.ioctl(k.vm_fd, KVM_MEMORY_ENCRYPT_OP, cmd)
            except OSError as e:
                err = e.errno
            fw = KvmSevCmd.parse(k.read(cmd, KvmSevCmd.sizeof())).error
            out = struct.parse(k.read(data, struct.sizeof())) if struct is not None else None
        finally:
            self._scratch_done(cmd)
            if data:
                self._scratch_done(data)
        if err and check:
            gpa = self._first_hole(*span) if span and err in (E.ENOMEM, E.EFAULT) else None
            raise self._error(what, err, fw if err == E.EIO else None, gpa)
        return out

    @staticmethod
    def _error(what: str, err: int, fw: int | None, gpa: int | None = None) -> SevError:
        if gpa is not None:
            msg = (f"SEV: {what} failed: guest physical address {gpa:#x} is not RAM "
                   f"(the kernel could not pin its page: errno {E.errorcode.get(err, err)})")
        elif fw is not None:
            msg = f"SEV: {what} failed: {fw_error_to_str(fw) or 'success'} (fw error {fw})"
        else:
            msg = f"SEV: {what} failed: {os.strerror(err)} (errno {E.errorcode.get(err, err)})"
        return SevError(msg, errno=err, fw_error=fw, gpa=gpa)
