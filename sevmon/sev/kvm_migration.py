"""KVM's SEND_* / RECEIVE_* ioctls on the simulated kernel (Linux ``arch/x86/kvm/svm/sev.c``).

One block, registered into :class:`~sevmon.sev.transport.SimulatedKvm`'s dispatch by
:func:`install`, so the transport can be split without touching it. What each does:

- ``sev_send_start``: ``session_len == 0`` is a length query (the PSP's INVALID_LEN and
  the length copied back); otherwise the PDH/platform/AMD certificate blobs are copied into
  kernel buffers (``psp_copy_user_blob``, 16 KiB max), the session comes back to the user
  with the policy.
- ``sev_send_update_data`` / ``sev_receive_update_data``: at most one guest page (the
  range may not cross a page: -EINVAL), the guest page pinned, header and transport buffer
  bounced through kernel memory.
- ``sev_receive_start``: like LAUNCH_START, a new handle bound to the VM's ASID (ACTIVATE;
  DECOMMISSION if that fails).
- SEND_FINISH, SEND_CANCEL, RECEIVE_FINISH: the handle only.
"""

from __future__ import annotations

import errno as E

from construct import Default, Int32ul, Int64ul, Struct

from .abi import (
    PAGE_SIZE,
    SEV_FW_BLOB_MAX_SIZE,
    FwCmd,
    KvmSevLaunchSecret,
    KvmSevLaunchStart,
    SevCmdId,
    SevDataActivate,
    SevDataHandle,
)
from .firmware_migration import SevDataReceiveStart, SevDataSendStart, SevDataSendUpdateData


def _u32(n):
    return n / Default(Int32ul, 0)


def _u64(n):
    return n / Default(Int64ul, 0)


KvmSevSendStart = Struct(
    _u32("policy"), _u32("pad0"), _u64("pdh_cert_uaddr"), _u32("pdh_cert_len"), _u32("pad1"),
    _u64("plat_certs_uaddr"), _u32("plat_certs_len"), _u32("pad2"),
    _u64("amd_certs_uaddr"), _u32("amd_certs_len"), _u32("pad3"),
    _u64("session_uaddr"), _u32("session_len"), _u32("pad4"),
)
KvmSevSendUpdateData = KvmSevLaunchSecret   # same 48-byte shape
KvmSevReceiveStart = KvmSevLaunchStart      # same 40-byte shape (pdh_uaddr/pdh_len are dh_*)
KvmSevReceiveUpdateData = KvmSevLaunchSecret


def _errno(kvm, code: int):
    from .transport import _Errno
    return _Errno(code)


def send_start(kvm, cmd) -> int:
    kvm._require_sev()
    params = kvm._data(cmd, KvmSevSendStart)
    if not params.session_len:  # __sev_send_start_query_session_length
        buf = bytearray(SevDataSendStart.build(dict(handle=kvm._handle)))
        r = kvm._sev_issue(FwCmd.SEND_START, buf, cmd)
        params.session_len = SevDataSendStart.parse(bytes(buf)).session_len
        kvm._uwrite(cmd.data, KvmSevSendStart.build(params))
        return r
    if (not params.pdh_cert_uaddr or not params.pdh_cert_len or not params.session_uaddr
            or params.session_len > SEV_FW_BLOB_MAX_SIZE):
        raise _errno(kvm, E.EINVAL)
    blobs = []
    try:
        pdh, _ = kvm._copy_user_blob(params.pdh_cert_uaddr, params.pdh_cert_len)
        blobs.append(pdh)
        plat, _ = kvm._copy_user_blob(params.plat_certs_uaddr, params.plat_certs_len)
        blobs.append(plat)
        amd = 0
        if params.amd_certs_uaddr:
            amd, _ = kvm._copy_user_blob(params.amd_certs_uaddr, params.amd_certs_len)
            blobs.append(amd)
        session, _ = kvm.host.kalloc(params.session_len)
        blobs.append(session)
        buf = bytearray(SevDataSendStart.build(dict(
            handle=kvm._handle, pdh_cert_address=pdh, pdh_cert_len=params.pdh_cert_len,
            plat_certs_address=plat, plat_certs_len=params.plat_certs_len,
            amd_certs_address=amd, amd_certs_len=params.amd_certs_len if amd else 0,
            session_address=session, session_len=params.session_len)))
        r = kvm._sev_issue(FwCmd.SEND_START, buf, cmd)
        if r:
            return r
        out = SevDataSendStart.parse(bytes(buf))
        kvm._uwrite(params.session_uaddr, kvm.host.dram.read(session, out.session_len))
        params.policy, params.session_len = out.policy, out.session_len
        kvm._uwrite(cmd.data, KvmSevSendStart.build(params))
        return 0
    finally:
        for hpa in blobs:
            kvm.host.kfree(hpa)


def _update_data(kvm, cmd, *, receive: bool) -> int:
    kvm._require_sev()
    params = kvm._data(cmd, KvmSevSendUpdateData)
    if (not params.hdr_uaddr or not params.hdr_len or not params.guest_uaddr or not params.guest_len
            or not params.trans_uaddr or not params.trans_len or params.trans_len > PAGE_SIZE):
        raise _errno(kvm, E.EINVAL)
    offset = params.guest_uaddr & (PAGE_SIZE - 1)
    if offset + params.guest_len > PAGE_SIZE:  # one page at a time
        raise _errno(kvm, E.EINVAL)
    pages = kvm._pin(params.guest_uaddr & ~(PAGE_SIZE - 1), PAGE_SIZE)
    blobs = []
    try:
        if receive:
            hdr, _ = kvm._copy_user_blob(params.hdr_uaddr, params.hdr_len)
            trans, _ = kvm._copy_user_blob(params.trans_uaddr, params.trans_len)
        else:
            hdr, _ = kvm.host.kalloc(params.hdr_len)
            trans, _ = kvm.host.kalloc(params.trans_len)
        blobs += [hdr, trans]
        buf = bytearray(SevDataSendUpdateData.build(dict(
            handle=kvm._handle, hdr_address=hdr, hdr_len=params.hdr_len,
            guest_address=pages[0] + offset, guest_len=params.guest_len,
            trans_address=trans, trans_len=params.trans_len)))
        r = kvm._sev_issue(FwCmd.RECEIVE_UPDATE_DATA if receive else FwCmd.SEND_UPDATE_DATA, buf, cmd)
        if r or receive:
            return r
        kvm._uwrite(params.trans_uaddr, kvm.host.dram.read(trans, params.trans_len))
        kvm._uwrite(params.hdr_uaddr, kvm.host.dram.read(hdr, params.hdr_len))
        return 0
    finally:
        for hpa in blobs:
            kvm.host.kfree(hpa)
        kvm._unpin(pages)


def receive_start(kvm, cmd) -> int:
    kvm._require_sev()
    params = kvm._data(cmd, KvmSevReceiveStart)
    if not params.dh_uaddr or not params.dh_len or not params.session_uaddr or not params.session_len:
        raise _errno(kvm, E.EINVAL)
    blobs = []
    try:
        pdh, _ = kvm._copy_user_blob(params.dh_uaddr, params.dh_len)
        blobs.append(pdh)
        session, _ = kvm._copy_user_blob(params.session_uaddr, params.session_len)
        blobs.append(session)
        if cmd.sev_fd != kvm.sev_fd:
            raise _errno(kvm, E.EBADF)
        buf = bytearray(SevDataReceiveStart.build(dict(
            handle=0, policy=params.policy, dh_cert_address=pdh, dh_cert_len=params.dh_len,
            session_address=session, session_len=params.session_len)))
        r = kvm._fw(FwCmd.RECEIVE_START, buf, cmd)
        if r:
            return r
        handle = SevDataReceiveStart.parse(bytes(buf)).handle
        r = kvm._fw(FwCmd.ACTIVATE, bytearray(SevDataActivate.build(dict(handle=handle, asid=kvm._asid))), cmd)
        if r:
            kvm._fw(FwCmd.DECOMMISSION, bytearray(SevDataHandle.build(dict(handle=handle))))
            return r
        params.handle = handle
        kvm._uwrite(cmd.data, KvmSevReceiveStart.build(params))
        kvm._handle, kvm._fd, kvm._policy = handle, cmd.sev_fd, params.policy
        return 0
    finally:
        for hpa in blobs:
            kvm.host.kfree(hpa)


def _handle_only(fwcmd):
    def op(kvm, cmd) -> int:
        kvm._require_sev()
        return kvm._sev_issue(fwcmd, bytearray(SevDataHandle.build(dict(handle=kvm._handle))), cmd)
    return op


def install(dispatch: dict) -> None:
    """Register the ops into a ``SimulatedKvm._dispatch`` table."""
    dispatch.update({
        SevCmdId.SEND_START: send_start,
        SevCmdId.SEND_UPDATE_DATA: lambda kvm, cmd: _update_data(kvm, cmd, receive=False),
        SevCmdId.SEND_FINISH: _handle_only(FwCmd.SEND_FINISH),
        SevCmdId.SEND_CANCEL: _handle_only(FwCmd.SEND_CANCEL),
        SevCmdId.RECEIVE_START: receive_start,
        SevCmdId.RECEIVE_UPDATE_DATA: lambda kvm, cmd: _update_data(kvm, cmd, receive=True),
        SevCmdId.RECEIVE_FINISH: _handle_only(FwCmd.RECEIVE_FINISH),
    })
