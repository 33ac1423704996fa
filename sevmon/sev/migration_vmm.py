"""The VMM's half of SEV migration (what the SEV live-migration series adds to QEMU's
``target/i386/sev.c``): each step one ``KVM_MEMORY_ENCRYPT_OP`` round trip on a
:class:`~sevmon.sev.vm.SevVm`, failures in QEMU's words
(``sev_send_start: SEND_START ret=-1 fw_error=7 'Policy is not allowed'``).
"""

from __future__ import annotations

from .abi import PACKET_HEADER_LEN, PAGE_SHIFT, PAGE_SIZE, GuestState, SevCmdId, fw_error_to_str
from .kvm_migration import KvmSevReceiveStart, KvmSevSendStart, KvmSevSendUpdateData
from .vm import SevError, SevVm


def _qemu_error(func: str, what: str, e: SevError) -> SevError:
    fw = e.fw_error if e.fw_error is not None else 0
    return SevError(f"{func}: {what} ret=-1 fw_error={fw} '{fw_error_to_str(fw)}'", errno=e.errno, fw_error=e.fw_error)


def _with_buffers(sev: SevVm, blobs: dict[str, bytes], sizes: dict[str, int], run):
    """Put ``blobs`` in process buffers (and allocate ``sizes``), run ``run(hvas)``, free them."""
    k, hvas = sev.kernel, {}
    try:
        for name, blob in blobs.items():
            hvas[name] = k.alloc(len(blob))
            k.write(hvas[name], blob)
        for name, n in sizes.items():
            hvas[name] = k.alloc(n)
        return run(hvas)
    finally:
        for hva in hvas.values():
            k.free(hva)


def send_start(sev: SevVm, pdh: bytes, plat_certs: bytes, amd_certs: bytes) -> tuple[bytes, int]:
    """SEND_START to the target whose PDH and chain are given: ``(session, policy)``."""
    try:
        probe = sev._op(SevCmdId.SEND_START, "SEND_START", KvmSevSendStart, {}, check=False)
        need = probe.session_len or 128

        def run(h):
            values = dict(pdh_cert_uaddr=h["pdh"], pdh_cert_len=len(pdh), plat_certs_uaddr=h["plat"],
                          plat_certs_len=len(plat_certs), session_uaddr=h["session"], session_len=need)
            if amd_certs:
                values.update(amd_certs_uaddr=h["amd"], amd_certs_len=len(amd_certs))
            out = sev._op(SevCmdId.SEND_START, "SEND_START", KvmSevSendStart, values)
            return sev.kernel.read(h["session"], out.session_len), out.policy
        blobs = {"pdh": pdh, "plat": plat_certs}
        if amd_certs:
            blobs["amd"] = amd_certs
        result = _with_buffers(sev, blobs, {"session": need}, run)
    except SevError as e:
        raise _qemu_error("sev_send_start", "SEND_START", e) from None
    sev._state = GuestState.SUPDATE
    return result


def send_page(sev: SevVm, gpa: int) -> tuple[bytes, bytes]:
    """SEND_UPDATE_DATA of the guest page at ``gpa``: ``(packet header, transport data)``."""
    def run(h):
        sev._op(SevCmdId.SEND_UPDATE_DATA, "SEND_UPDATE_DATA", KvmSevSendUpdateData, dict(
            hdr_uaddr=h["hdr"], hdr_len=PACKET_HEADER_LEN, guest_uaddr=sev._ram_hva + gpa, guest_len=PAGE_SIZE,
            trans_uaddr=h["trans"], trans_len=PAGE_SIZE), span=(gpa, PAGE_SIZE))
        return sev.kernel.read(h["hdr"], PACKET_HEADER_LEN), sev.kernel.read(h["trans"], PAGE_SIZE)
    try:
        return _with_buffers(sev, {}, {"hdr": PACKET_HEADER_LEN, "trans": PAGE_SIZE}, run)
    except SevError as e:
        raise _qemu_error("sev_send_update_data", "SEND_UPDATE_DATA", e) from None


def send_finish(sev: SevVm, *, cancel: bool = False) -> None:
    """SEND_FINISH (the guest now lives on the target) or SEND_CANCEL (it keeps running here)."""
    cid, what = (SevCmdId.SEND_CANCEL, "SEND_CANCEL") if cancel else (SevCmdId.SEND_FINISH, "SEND_FINISH")
    try:
        sev._op(cid, what)
    except SevError as e:
        raise _qemu_error("sev_send_finish", what, e) from None
    sev._state = GuestState.RUNNING if cancel else GuestState.SENT


def receive_start(sev: SevVm, source_pdh: bytes, session: bytes, policy: int) -> None:
    """RECEIVE_START: a new guest (handle, VEK) whose channel comes from the source's session."""
    def run(h):
        return sev._op(SevCmdId.RECEIVE_START, "RECEIVE_START", KvmSevReceiveStart, dict(
            handle=0, policy=policy, dh_uaddr=h["pdh"], dh_len=len(source_pdh),
            session_uaddr=h["session"], session_len=len(session)))
    try:
        out = _with_buffers(sev, {"pdh": source_pdh, "session": session}, {}, run)
    except SevError as e:
        raise _qemu_error("sev_receive_start", "RECEIVE_START", e) from None
    sev.handle, sev.policy = out.handle, policy
    sev._state = GuestState.RUPDATE


def receive_page(sev: SevVm, gpa: int, header: bytes, trans: bytes) -> None:
    """RECEIVE_UPDATE_DATA into the page at ``gpa``; a refused packet leaves the page as it was
    (a frame faulted in for it is dropped again)."""
    if gpa < 0 or gpa % PAGE_SIZE or gpa + PAGE_SIZE > sev.ram.size or len(trans) != PAGE_SIZE:
        raise SevError(f"sev_receive_update_data: bad page record at gpa {gpa:#x}")
    pfn = gpa >> PAGE_SHIFT
    fresh = not sev.ram.stored(pfn)
    sev.ram.ensure(pfn)

    def run(h):
        sev._op(SevCmdId.RECEIVE_UPDATE_DATA, "RECEIVE_UPDATE_DATA", KvmSevSendUpdateData, dict(
            hdr_uaddr=h["hdr"], hdr_len=len(header), guest_uaddr=sev._ram_hva + gpa, guest_len=PAGE_SIZE,
            trans_uaddr=h["trans"], trans_len=len(trans)))
    try:
        _with_buffers(sev, {"hdr": header, "trans": trans}, {}, run)
    except SevError as e:
        if fresh:
            sev.ram.drop(pfn)
        raise _qemu_error("sev_receive_update_data", "RECEIVE_UPDATE_DATA", e) from None


def receive_finish(sev: SevVm) -> None:
    """RECEIVE_FINISH: the guest runs on this platform with its new key."""
    try:
        sev._op(SevCmdId.RECEIVE_FINISH, "RECEIVE_FINISH")
    except SevError as e:
        raise _qemu_error("sev_receive_finish", "RECEIVE_FINISH", e) from None
    sev._state = GuestState.RUNNING
