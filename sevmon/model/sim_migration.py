"""KVM's SEND_* / RECEIVE_* ops on the simulated kernel (Linux ``arch/x86/kvm/svm/sev.c``).

A mixin of :class:`~sevmon.model.sim_kvm.SimulatedKvm`, which provides ``mem``, ``host``, ``_handle``, ``_asid``,
``_data``, ``_fw``, ``_sev_issue`` and ``_require_sev``. What each op does:

- ``sev_send_start``: ``session_len == 0`` is a length query (the PSP's INVALID_LEN and the length copied back);
  otherwise the PDH/platform/AMD certificate blobs are copied into kernel buffers (``psp_copy_user_blob``, 16 KiB
  max), the session comes back to the user with the policy.
- ``sev_send_update_data`` / ``sev_receive_update_data``: at most one guest page (the range may not cross a page:
  -EINVAL), the guest page pinned, header and transport buffer bounced through kernel memory.
- ``sev_receive_start``: like LAUNCH_START, a new handle bound to the VM's ASID (ACTIVATE; DECOMMISSION if that
  fails).
- SEND_FINISH, SEND_CANCEL, RECEIVE_FINISH: the handle only.
"""

from __future__ import annotations

import errno as E

from construct import Container

from sevmon.sev.abi import PAGE_SIZE, SEV_FW_BLOB_MAX_SIZE, FwCmd, SevDataHandle
from sevmon.sev.kvm_migration import KvmSevReceiveStart, KvmSevSendStart, KvmSevSendUpdateData

from .firmware_migration import SevDataReceiveStart, SevDataSendStart, SevDataSendUpdateData
from .sim_host import KernelError


class MigrationOps:
    """The SEND/RECEIVE ops of one VM."""

    def _op_send_start(self, cmd: Container) -> int:
        self._require_sev()
        params = self._data(cmd, KvmSevSendStart)
        if not params.session_len:  # __sev_send_start_query_session_length
            buf = bytearray(SevDataSendStart.build(dict(handle=self._handle)))
            r = self._sev_issue(FwCmd.SEND_START, buf, cmd)
            params.session_len = SevDataSendStart.parse(bytes(buf)).session_len
            self.mem.uwrite(cmd.data, KvmSevSendStart.build(params))
            return r
        if (not params.pdh_cert_uaddr or not params.pdh_cert_len or not params.session_uaddr
                or params.session_len > SEV_FW_BLOB_MAX_SIZE):
            raise KernelError(E.EINVAL)
        blobs = []
        try:
            pdh = self.mem.copy_user_blob(params.pdh_cert_uaddr, params.pdh_cert_len)
            blobs.append(pdh)
            plat = self.mem.copy_user_blob(params.plat_certs_uaddr, params.plat_certs_len)
            blobs.append(plat)
            amd = 0
            if params.amd_certs_uaddr:
                amd = self.mem.copy_user_blob(params.amd_certs_uaddr, params.amd_certs_len)
                blobs.append(amd)
            session, _ = self.host.kalloc(params.session_len)
            blobs.append(session)
            buf = bytearray(SevDataSendStart.build(dict(
                handle=self._handle, pdh_cert_address=pdh, pdh_cert_len=params.pdh_cert_len,
                plat_certs_address=plat, plat_certs_len=params.plat_certs_len,
                amd_certs_address=amd, amd_certs_len=params.amd_certs_len if amd else 0,
                session_address=session, session_len=params.session_len)))
            r = self._sev_issue(FwCmd.SEND_START, buf, cmd)
            if r:
                return r
            out = SevDataSendStart.parse(bytes(buf))
            self.mem.uwrite(params.session_uaddr, self.host.dram.read(session, out.session_len))
            params.policy, params.session_len = out.policy, out.session_len
            self.mem.uwrite(cmd.data, KvmSevSendStart.build(params))
            return 0
        finally:
            for hpa in blobs:
                self.host.kfree(hpa)

    def _op_update_data(self, cmd: Container, *, receive: bool) -> int:
        self._require_sev()
        params = self._data(cmd, KvmSevSendUpdateData)
        if (not params.hdr_uaddr or not params.hdr_len or not params.guest_uaddr or not params.guest_len
                or not params.trans_uaddr or not params.trans_len or params.trans_len > PAGE_SIZE):
            raise KernelError(E.EINVAL)
        offset = params.guest_uaddr & (PAGE_SIZE - 1)
        if offset + params.guest_len > PAGE_SIZE:  # one page at a time
            raise KernelError(E.EINVAL)
        pages = self.mem.pin(params.guest_uaddr & ~(PAGE_SIZE - 1), PAGE_SIZE)
        blobs = []
        try:
            if receive:
                hdr = self.mem.copy_user_blob(params.hdr_uaddr, params.hdr_len)
                blobs.append(hdr)
                trans = self.mem.copy_user_blob(params.trans_uaddr, params.trans_len)
                blobs.append(trans)
            else:
                hdr, _ = self.host.kalloc(params.hdr_len)
                blobs.append(hdr)
                trans, _ = self.host.kalloc(params.trans_len)
                blobs.append(trans)
            buf = bytearray(SevDataSendUpdateData.build(dict(
                handle=self._handle, hdr_address=hdr, hdr_len=params.hdr_len,
                guest_address=pages[0] + offset, guest_len=params.guest_len,
                trans_address=trans, trans_len=params.trans_len)))
            r = self._sev_issue(FwCmd.RECEIVE_UPDATE_DATA if receive else FwCmd.SEND_UPDATE_DATA, buf, cmd)
            if r or receive:
                return r
            self.mem.uwrite(params.trans_uaddr, self.host.dram.read(trans, params.trans_len))
            self.mem.uwrite(params.hdr_uaddr, self.host.dram.read(hdr, params.hdr_len))
            return 0
        finally:
            for hpa in blobs:
                self.host.kfree(hpa)
            self.mem.unpin(pages)

    def _op_receive_start(self, cmd: Container) -> int:
        self._require_sev()
        params = self._data(cmd, KvmSevReceiveStart)
        if not params.dh_uaddr or not params.dh_len or not params.session_uaddr or not params.session_len:
            raise KernelError(E.EINVAL)
        blobs = []
        try:
            pdh = self.mem.copy_user_blob(params.dh_uaddr, params.dh_len)
            blobs.append(pdh)
            session = self.mem.copy_user_blob(params.session_uaddr, params.session_len)
            blobs.append(session)
            self._check_sev_fd(cmd)
            buf = bytearray(SevDataReceiveStart.build(dict(
                handle=0, policy=params.policy, dh_cert_address=pdh, dh_cert_len=params.dh_len,
                session_address=session, session_len=params.session_len)))
            r = self._fw(FwCmd.RECEIVE_START, buf, cmd)
            if r:
                return r
            handle = SevDataReceiveStart.parse(bytes(buf)).handle
            r = self._bind_asid(handle, cmd)
            if r:
                return r
            params.handle = handle
            self.mem.uwrite(cmd.data, KvmSevReceiveStart.build(params))
            self._handle, self._fd, self._policy = handle, cmd.sev_fd, params.policy
            return 0
        finally:
            for hpa in blobs:
                self.host.kfree(hpa)

    def _op_handle_only(self, cmd: Container, fwcmd: int) -> int:
        self._require_sev()
        return self._sev_issue(fwcmd, bytearray(SevDataHandle.build(dict(handle=self._handle))), cmd)
