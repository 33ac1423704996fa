"""SEND_* and RECEIVE_* in the firmware model (sev-api.md §3.9; AMD-ASPFW ``sev_mcmd.c``).

Why they exist: ciphertext is bound to the guest's VEK and to the physical address, so a
raw copy of an SEV guest's memory is garbage elsewhere. The source firmware re-encrypts each
page under a transport key (TEK) it agreed with the *target's* PDH, MACs it with the TIK,
and the target firmware verifies, decrypts and writes it with a new guest key.

- SEND_START (RUNNING -> SUPDATE): policy NOSEND -> POLICY_FAILURE; the target's PDH must be
  a valid PDH certificate signed by the PEK in ``plat_certs`` (PEK || OCA [|| CEK]), the PEK
  by that OCA (INVALID_CERTIFICATE / BAD_SIGNATURE); DOMAIN: the target's OCA must be ours;
  SEV: the target must prove an AMD-signed CEK, which no simulated platform can (the CEK has
  no ASK signature), so it is POLICY_FAILURE; API_MAJOR/MINOR: the target PDH's firmware
  version must be at least the policy's. ``session_len`` < 128 answers INVALID_LEN with 128.
- SEND_UPDATE_DATA (SUPDATE): up to one page, read with the guest key, AES-128-CTR under the
  TEK with a fresh IV; header ``{flags, iv, HMAC(TIK, 0x02||flags||iv||len||len||trans)}``.
- SEND_FINISH (SUPDATE -> SENT), SEND_CANCEL (SUPDATE -> RUNNING): the channel is closed.
- RECEIVE_START (-> RUPDATE): a new handle and a new VEK; the channel opened from the
  source's PDH certificate and session exactly as LAUNCH_START does (POLICY_MAC included).
- RECEIVE_UPDATE_DATA (RUPDATE): MAC verified first (BAD_MEASUREMENT: nothing written),
  then decrypted and written with the new guest key. RECEIVE_FINISH (RUPDATE -> RUNNING).
"""

from __future__ import annotations

import hmac

from construct import Default, Int32ul, Int64ul, Struct
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sevmon.sev.abi import (
    CERT_SIGNED_LEN,
    CHANNEL_CTX_DATA,
    PACKET_HEADER_LEN,
    PAGE_SIZE,
    SESSION_LEN,
    SEV_CERT_LEN,
    SEV_GUEST_COUNT_MAX,
    FwCmd,
    GuestState,
    PacketHeader,
    PlatformState,
    Policy,
    SevDataHandle,
    SevDataLaunchSecret,
    SevDataLaunchStart,
    SevRet,
)

from .channel import ChannelError, cert_public_key, open_client, open_server, packet_mac
from .engine import MemoryKey

POLICY_DOMAIN = 1 << 4
POLICY_SEV = 1 << 5


def _u32(n):
    return n / Default(Int32ul, 0)


def _u64(n):
    return n / Default(Int64ul, 0)


SevDataSendStart = Struct(
    _u32("handle"), _u32("policy"), _u64("pdh_cert_address"), _u32("pdh_cert_len"), _u32("reserved"),
    _u64("plat_certs_address"), _u32("plat_certs_len"), _u32("reserved2"),
    _u64("amd_certs_address"), _u32("amd_certs_len"), _u32("reserved3"),
    _u64("session_address"), _u32("session_len"),
)
# SEND/RECEIVE_UPDATE_DATA share LAUNCH_SECRET's shape; RECEIVE_START shares LAUNCH_START's.
SevDataSendUpdateData = SevDataLaunchSecret
SevDataReceiveStart = SevDataLaunchStart


def _signed_by(cert: bytes, signer: bytes) -> bool:
    """Signature slot 0 or 1 of ``cert`` verifies with ``signer``'s key."""
    key = cert_key(signer)
    for slot in (0, 1):
        sig = cert[CERT_SIGNED_LEN + slot * 0x208:]
        r, s = int.from_bytes(sig[8:80], "little"), int.from_bytes(sig[80:152], "little")
        try:
            key.verify(utils.encode_dss_signature(r, s), cert[:CERT_SIGNED_LEN], ec.ECDSA(hashes.SHA256()))
            return True
        except Exception:
            continue
    return False


def cert_key(cert: bytes) -> ec.EllipticCurvePublicKey:
    x, y = int.from_bytes(cert[20:92], "little"), int.from_bytes(cert[92:164], "little")
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP384R1()).public_key()


class MigrationCommands:
    """The handlers, bound to one :class:`~sevmon.model.firmware.SevFirmware`."""

    def __init__(self, fw, guest_context):
        """``guest_context``: the firmware's per-guest record class (passed in: no import back into firmware)."""
        self.fw, self.guest_context = fw, guest_context

    def install(self) -> None:
        self.fw._handlers.update({
            FwCmd.SEND_START: self.send_start, FwCmd.SEND_UPDATE_DATA: self.send_update_data,
            FwCmd.SEND_FINISH: lambda b: self._close(b, GuestState.SUPDATE, GuestState.SENT),
            FwCmd.SEND_CANCEL: lambda b: self._close(b, GuestState.SUPDATE, GuestState.RUNNING),
            FwCmd.RECEIVE_START: self.receive_start, FwCmd.RECEIVE_UPDATE_DATA: self.receive_update_data,
            FwCmd.RECEIVE_FINISH: lambda b: self._close(b, GuestState.RUPDATE, GuestState.RUNNING),
        })

    # -- helpers ------------------------------------------------------------------------
    def _working_guest(self, handle: int, state: GuestState):
        if self.fw.state != PlatformState.WORKING:
            return None, SevRet.INVALID_PLATFORM_STATE
        guest = self.fw._guest(handle)
        if guest is None:
            return None, SevRet.INVALID_GUEST
        if guest.state != state:
            return None, SevRet.INVALID_GUEST_STATE
        return guest, SevRet.SUCCESS

    def _close(self, buf: bytearray, state: GuestState, to: GuestState) -> SevRet:
        guest, r = self._working_guest(SevDataHandle.parse(bytes(buf[:4])).handle, state)
        if guest is None:
            return r
        if to == GuestState.RUNNING and guest.pending:  # RECEIVE_FINISH: the ASID becomes valid
            guest.pending, guest.active = False, True
            self.fw._allocated.discard(guest.asid)
            self.fw._in_use.add(guest.asid)
        guest.tek = guest.tik = bytes(16)  # sev_channel_close
        guest.state = to
        return SevRet.SUCCESS

    # -- send ---------------------------------------------------------------------------
    def send_start(self, buf: bytearray) -> SevRet:
        fw = self.fw
        p = SevDataSendStart.parse(bytes(buf).ljust(SevDataSendStart.sizeof(), b"\0"))
        guest, r = self._working_guest(p.handle, GuestState.RUNNING)
        if guest is None:
            return r
        if p.session_len < SESSION_LEN:  # a length query: tell the caller what it needs
            buf[:SevDataSendStart.sizeof()] = SevDataSendStart.build(dict(p, session_len=SESSION_LEN))
            return SevRet.INVALID_LEN
        if guest.policy & Policy.NOSEND:
            return SevRet.POLICY_FAILURE
        if p.pdh_cert_len != SEV_CERT_LEN or p.plat_certs_len < 2 * SEV_CERT_LEN \
                or p.plat_certs_len % SEV_CERT_LEN:
            return SevRet.INVALID_LEN
        pdh = fw.mc.read(p.pdh_cert_address, SEV_CERT_LEN)
        plat = fw.mc.read(p.plat_certs_address, p.plat_certs_len)
        pek, oca = plat[:SEV_CERT_LEN], plat[SEV_CERT_LEN:2 * SEV_CERT_LEN]
        try:
            peer = cert_public_key(pdh)
            cert_key(pek), cert_key(oca)
        except (ChannelError, ValueError):
            return SevRet.INVALID_CERTIFICATE
        if not (_signed_by(pdh, pek) and _signed_by(pek, oca)):
            return SevRet.BAD_SIGNATURE
        ident = fw._identity()
        if guest.policy & POLICY_DOMAIN and oca[:CERT_SIGNED_LEN] != ident.oca_cert[:CERT_SIGNED_LEN]:
            return SevRet.POLICY_FAILURE  # another owner's domain
        if guest.policy & POLICY_SEV:
            return SevRet.POLICY_FAILURE  # needs an AMD-signed CEK: not available to a model
        need = ((guest.policy >> 16) & 0xFF, (guest.policy >> 24) & 0xFF)
        if (pdh[4], pdh[5]) < need:
            return SevRet.POLICY_FAILURE  # the target's firmware is older than the policy allows
        session, tek, tik = open_client(ident.pdh, peer, guest.policy, fw._rng)
        fw.mc.write(p.session_address, session)
        guest.tek, guest.tik = tek, tik
        guest.state = GuestState.SUPDATE
        buf[:SevDataSendStart.sizeof()] = SevDataSendStart.build(dict(p, policy=guest.policy, session_len=SESSION_LEN))
        return SevRet.SUCCESS

    def _packet_checks(self, p, guest) -> SevRet:
        if guest.inactive:
            return SevRet.INACTIVE
        if p.guest_address % 16:
            return SevRet.INVALID_ADDRESS
        if (p.hdr_len != PACKET_HEADER_LEN or not p.guest_len or p.guest_len % 16 or p.guest_len > PAGE_SIZE
                or p.guest_len != p.trans_len):
            return SevRet.INVALID_LEN
        return SevRet.SUCCESS

    def send_update_data(self, buf: bytearray) -> SevRet:
        fw = self.fw
        p = SevDataSendUpdateData.parse(bytes(buf[:SevDataSendUpdateData.sizeof()]))
        guest, r = self._working_guest(p.handle, GuestState.SUPDATE)
        if guest is None:
            return r
        r = self._packet_checks(p, guest)
        if r:
            return r
        plain = fw.mc.read(p.guest_address, p.guest_len, guest.asid)
        iv = fw._rng(16)
        trans = Cipher(algorithms.AES(guest.tek), modes.CTR(iv)).encryptor().update(plain)
        mac = packet_mac(guest.tik, CHANNEL_CTX_DATA, 0, iv, p.guest_len, trans)
        fw.mc.write(p.trans_address, trans)
        fw.mc.write(p.hdr_address, PacketHeader.build(dict(flags=0, iv=iv, mac=mac)))
        return SevRet.SUCCESS

    # -- receive ------------------------------------------------------------------------
    def receive_start(self, buf: bytearray) -> SevRet:
        fw = self.fw
        if fw.state not in (PlatformState.INIT, PlatformState.WORKING):
            return SevRet.INVALID_PLATFORM_STATE
        p = SevDataReceiveStart.parse(bytes(buf[:SevDataReceiveStart.sizeof()]))
        if p.session_len != SESSION_LEN or p.dh_cert_len != SEV_CERT_LEN:
            return SevRet.INVALID_LEN
        try:
            tek, tik = open_server(fw._identity().pdh, fw.mc.read(p.dh_cert_address, SEV_CERT_LEN),
                                   fw.mc.read(p.session_address, SESSION_LEN), p.policy)
        except ChannelError as e:
            return e.status
        handle = next((h for h in range(1, SEV_GUEST_COUNT_MAX + 1) if h not in fw.guests), None)
        if handle is None:
            return SevRet.RESOURCE_LIMIT
        guest = self.guest_context(handle=handle, policy=p.policy, vek=MemoryKey(fw._rng(32)), tek=tek, tik=tik,
                             state=GuestState.RUPDATE)
        guest.ld = None
        fw.guests[handle] = guest
        fw.state = PlatformState.WORKING
        buf[:SevDataReceiveStart.sizeof()] = SevDataReceiveStart.build(dict(p, handle=handle))
        return SevRet.SUCCESS

    def receive_update_data(self, buf: bytearray) -> SevRet:
        fw = self.fw
        p = SevDataSendUpdateData.parse(bytes(buf[:SevDataSendUpdateData.sizeof()]))
        guest, r = self._working_guest(p.handle, GuestState.RUPDATE)
        if guest is None:
            return r
        r = self._packet_checks(p, guest)
        if r:
            return r
        hdr = PacketHeader.parse(fw.mc.read(p.hdr_address, PACKET_HEADER_LEN))
        trans = fw.mc.read(p.trans_address, p.trans_len)
        if not hmac.compare_digest(packet_mac(guest.tik, CHANNEL_CTX_DATA, hdr.flags, hdr.iv, p.guest_len, trans),
                                   hdr.mac):
            return SevRet.BAD_MEASUREMENT
        if hdr.flags & 1:
            return SevRet.UNSUPPORTED  # compressed packets
        plain = Cipher(algorithms.AES(guest.tek), modes.CTR(hdr.iv)).decryptor().update(trans)
        fw.mc.write(p.guest_address, plain, guest.asid)
        return SevRet.SUCCESS
