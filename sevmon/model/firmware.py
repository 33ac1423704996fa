"""The PSP: a software model of the legacy-SEV firmware (sev-api.md §2.5, §3).

Why a model at this level: the monitor's correctness depends on *which* errors come back in
*which* order (e.g. DBG checks alignment before the handle, and never the guest state) and
on the launch measurement being the real HMAC, so a guest owner's tooling verifies it.
Semantics follow AMD's published firmware source (AMD-ASPFW, Genoa 1.55.25).

Interface: :meth:`SevFirmware.call` takes a command id and its packed ``sev_data_*`` buffer
(mutable: output fields are written back, as the PSP writes the mailbox buffer). All
addresses are system physical; the firmware touches memory only through the
:class:`~sevmon.model.engine.MemoryController`, with the guest's ASID when it means the
guest's key. :meth:`SevFirmware.dbg_crypt` is the typed DBG entry point the simulated
kernel uses to run many adjacent page-sized DBG commands as one engine pass.

The platform identity is real enough to verify: OCA (self-signed), PEK (signed by OCA and
CEK), PDH (signed by PEK) and an unsigned CEK in ``sev_cert`` format with P-384 keys, as
PDH_CERT_EXPORT returns them; the PEK signs attestation reports. The CEK's AMD (ASK)
signature cannot exist here.

LAUNCH_START with a DH certificate opens the guest owner's channel (ECDH with the PDH,
KEK/KIK, TEK/TIK: :mod:`sevmon.model.channel`); SEND_*/RECEIVE_* migrate a guest between
platforms (:mod:`sevmon.model.firmware_migration`). Not modelled (answer ``UNSUPPORTED``):
PEK_GEN/PEK_CSR/PEK_CERT_IMPORT/PDH_GEN, SEND/RECEIVE_UPDATE_VMSA, COPY, ACTIVATE_EX, INIT_EX,
DOWNLOAD_FIRMWARE, SNP. Without a DH certificate TEK = TIK = 16 zero
bytes, exactly as the firmware does for QEMU without ``dh-cert-file``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sevmon.sev.abi import (
    ATTESTATION_REPORT_LEN,
    ATTESTATION_SIGNED_LEN,
    CERT_ALGO_ECDH_SHA256,
    CERT_ALGO_ECDSA_SHA256,
    CERT_CURVE_P384,
    CERT_SIGNED_LEN,
    CERT_USAGE_CEK,
    CERT_USAGE_INVALID,
    CERT_USAGE_OCA,
    CERT_USAGE_PDH,
    CERT_USAGE_PEK,
    CHANNEL_CTX_MEASURE,
    CHANNEL_CTX_SECRET,
    GET_ID_LEN,
    MEASUREMENT_LEN,
    PACKET_FLAG_COMPRESSED,
    PACKET_HEADER_LEN,
    SESSION_LEN,
    SEV_CERT_LEN,
    SEV_GUEST_COUNT_MAX,
    SEV_SCRATCH_BUF_LEN,
    SEV_STATUS_FLAGS_CONFIG_ES,
    VMSA_SIZE,
    AttestationReport,
    FwCmd,
    GuestState,
    PacketHeader,
    PlatformState,
    Policy,
    SevDataActivate,
    SevDataAttestationReport,
    SevDataDbg,
    SevDataGetId,
    SevDataGuestStatus,
    SevDataHandle,
    SevDataInit,
    SevDataLaunchSecret,
    SevDataLaunchStart,
    SevDataLaunchUpdate,
    SevDataPdhCertExport,
    SevRet,
    SevUserDataStatus,
)

from .channel import ChannelError, open_server
from .engine import MemoryController, MemoryKey

# The modelled firmware version: Genoa 1.55 build 25 (hex 01.37.19), the AMD-ASPFW release.
API_MAJOR = 1
API_MINOR = 55
BUILD_ID = 25

_INIT_FLAG_ES = 0x1  # sev_data_init.flags bit 0: CONFIG.ES


def launch_measurement(tik: bytes, api_major: int, api_minor: int, build: int, policy: int,
                       digest: bytes, mnonce: bytes) -> bytes:
    """MEASURE = HMAC-SHA-256(TIK, 0x04 || major || minor || build || policy LE32 || LD || MNONCE)."""
    msg = (bytes((CHANNEL_CTX_MEASURE, api_major, api_minor, build)) + policy.to_bytes(4, "little")
           + bytes(digest) + bytes(mnonce))
    return hmac.new(bytes(tik), msg, hashlib.sha256).digest()


def _secret_mac(tik: bytes, flags: int, iv: bytes, guest_len: int, trans_len: int,
                trans: bytes, measurement: bytes) -> bytes:
    msg = (bytes((CHANNEL_CTX_SECRET,)) + flags.to_bytes(4, "little") + iv
           + guest_len.to_bytes(4, "little") + trans_len.to_bytes(4, "little") + trans + measurement)
    return hmac.new(tik, msg, hashlib.sha256).digest()


def package_secret(secret: bytes, measurement: bytes, *, tek: bytes = bytes(16), tik: bytes = bytes(16),
                   iv: bytes | None = None) -> tuple[bytes, bytes]:
    """The guest owner's side of LAUNCH_SECRET: ``(packet header, encrypted secret)``.

    ``measurement`` is the 32-byte MEASURE of the launch blob the owner verified; the defaults
    are the all-zero TEK/TIK of a launch without a DH certificate. ``secret`` must be a
    multiple of 16 bytes (the firmware's rule for ``guest_len``).
    """
    iv = os.urandom(16) if iv is None else bytes(iv)
    trans = Cipher(algorithms.AES(bytes(tek)), modes.CTR(iv)).encryptor().update(bytes(secret))
    mac = _secret_mac(bytes(tik), 0, iv, len(secret), len(trans), trans, bytes(measurement[:32]))
    return PacketHeader.build(dict(flags=0, iv=iv, mac=mac)), trans


def sev_cert(public_key: ec.EllipticCurvePublicKey, usage: int, algo: int,
             signers: tuple[tuple[ec.EllipticCurvePrivateKey, int], ...] = ()) -> bytes:
    """A 2084-byte ``sev_cert``: header, P-384 public key, two signature slots over 0x414 bytes."""
    nums = public_key.public_numbers()
    body = ((1).to_bytes(4, "little") + bytes((API_MAJOR, API_MINOR, 0, 0)) + usage.to_bytes(4, "little")
            + algo.to_bytes(4, "little") + CERT_CURVE_P384.to_bytes(4, "little")
            + nums.x.to_bytes(72, "little") + nums.y.to_bytes(72, "little") + bytes(880))
    assert len(body) == CERT_SIGNED_LEN
    sigs = b""
    for i in range(2):
        if i < len(signers):
            key, signer_usage = signers[i]
            r, s_ = utils.decode_dss_signature(key.sign(body, ec.ECDSA(hashes.SHA256())))
            sigs += (signer_usage.to_bytes(4, "little") + CERT_ALGO_ECDSA_SHA256.to_bytes(4, "little")
                     + r.to_bytes(72, "little") + s_.to_bytes(72, "little") + bytes(368))
        else:
            sigs += CERT_USAGE_INVALID.to_bytes(4, "little") + bytes(4 + 512)
    return body + sigs


class _Identity:
    """The platform's keys. CEK and chip id are chip-unique; FACTORY_RESET renews the rest."""

    def __init__(self, rng: Callable[[int], bytes], keys: dict | None = None):
        """``keys``: a stored identity (cek, oca, pek, pdh private keys and chip_id) to reuse."""
        keys = dict(keys or {})
        self.cek = keys.pop("cek", None) or ec.generate_private_key(ec.SECP384R1())
        self.chip_id = keys.pop("chip_id", None) or rng(GET_ID_LEN)
        self.renew(**keys)

    def renew(self, oca=None, pek=None, pdh=None) -> None:
        self.oca, self.pek, self.pdh = (k or ec.generate_private_key(ec.SECP384R1()) for k in (oca, pek, pdh))
        self.oca_cert = sev_cert(self.oca.public_key(), CERT_USAGE_OCA, CERT_ALGO_ECDSA_SHA256,
                                 ((self.oca, CERT_USAGE_OCA),))
        self.pek_cert = sev_cert(self.pek.public_key(), CERT_USAGE_PEK, CERT_ALGO_ECDSA_SHA256,
                                 ((self.oca, CERT_USAGE_OCA), (self.cek, CERT_USAGE_CEK)))
        self.cek_cert = sev_cert(self.cek.public_key(), CERT_USAGE_CEK, CERT_ALGO_ECDSA_SHA256)
        self.pdh_cert = sev_cert(self.pdh.public_key(), CERT_USAGE_PDH, CERT_ALGO_ECDH_SHA256,
                                 ((self.pek, CERT_USAGE_PEK),))


@dataclass(eq=False)
class GuestContext:
    """The firmware's per-guest state (one handle slot)."""

    handle: int
    policy: int
    vek: MemoryKey
    state: GuestState = GuestState.LUPDATE
    asid: int = 0
    pending: bool = False  # ACTIVATE before RUNNING: key installed, ASID not yet valid
    active: bool = False
    es: bool = False
    tek: bytes = bytes(16)
    tik: bytes = bytes(16)
    ld: object = field(default_factory=hashlib.sha256)  # launch digest context; None once finished
    launch_digest: bytes = bytes(32)  # kept for ATTESTATION_REPORT
    measurement: bytes = bytes(32)    # channel.measurement, MACed into LAUNCH_SECRET

    @property
    def inactive(self) -> bool:
        return not (self.pending or self.active)


class SevFirmware:
    """One PSP: platform state, guest handle slots, ASID bookkeeping, the UMC's key slots."""

    def __init__(self, mc: MemoryController, *, max_asid: int = 509,
                 rng: Callable[[int], bytes] = os.urandom):
        self.mc = mc
        self.max_asid = max_asid
        self.state = PlatformState.UNINIT
        self.config_flags = 0
        self.guests: dict[int, GuestContext] = {}
        self.commands = 0  # PSP commands executed (all callers)
        self._rng = rng
        self._dirty: set[int] = set()      # ran a guest since the last DF_FLUSH
        self._allocated: set[int] = set()  # bound to a guest pending activation
        self._in_use: set[int] = set()     # bound to a running guest
        self._ident: _Identity | None = None
        self._handlers: dict[int, Callable[[bytearray], SevRet]] = {
            FwCmd.INIT: self._init,
            FwCmd.SHUTDOWN: self._shutdown,
            FwCmd.FACTORY_RESET: self._factory_reset,
            FwCmd.PLATFORM_STATUS: self._platform_status,
            FwCmd.DF_FLUSH: self._df_flush,
            FwCmd.PDH_CERT_EXPORT: self._pdh_cert_export,
            FwCmd.GET_ID: self._get_id,
            FwCmd.DECOMMISSION: self._decommission,
            FwCmd.ACTIVATE: self._activate,
            FwCmd.DEACTIVATE: self._deactivate,
            FwCmd.GUEST_STATUS: self._guest_status,
            FwCmd.LAUNCH_START: self._launch_start,
            FwCmd.LAUNCH_UPDATE_DATA: lambda b: self._launch_update(b, vmsa=False),
            FwCmd.LAUNCH_UPDATE_VMSA: lambda b: self._launch_update(b, vmsa=True),
            FwCmd.LAUNCH_MEASURE: self._launch_measure,
            FwCmd.LAUNCH_UPDATE_SECRET: self._launch_secret,
            FwCmd.LAUNCH_FINISH: self._launch_finish,
            FwCmd.ATTESTATION_REPORT: self._attestation_report,
            FwCmd.DBG_DECRYPT: lambda b: self._dbg(b, encrypt=False),
            FwCmd.DBG_ENCRYPT: lambda b: self._dbg(b, encrypt=True),
        }
        from .firmware_migration import MigrationCommands
        MigrationCommands(self, GuestContext).install()  # SEND_* / RECEIVE_*

    # -- entry points ---------------------------------------------------------------------
    def call(self, cmd: int, buf: bytearray | None = None) -> SevRet:
        """Execute one mailbox command; output fields are written back into ``buf``."""
        self.commands += 1
        handler = self._handlers.get(cmd)
        if handler is None:
            return SevRet.UNSUPPORTED if cmd in FwCmd._value2member_map_ else SevRet.INVALID_COMMAND
        return handler(buf if buf is not None else bytearray())

    @property
    def guest_count(self) -> int:
        return len(self.guests)

    def pek_public_key(self) -> ec.EllipticCurvePublicKey:
        """The PEK that signs attestation reports (generated on first use)."""
        return self._identity().pek.public_key()

    def dbg_crypt(self, *, encrypt: bool, handle: int, src: int, dst: int, length: int,
                  commands: int = 1) -> SevRet:
        """DBG_DECRYPT / DBG_ENCRYPT with the firmware's exact check order (§2.5).

        ``commands`` > 1 means the caller is submitting that many back-to-back DBG commands
        over adjacent ranges that together are ``[src, src+length)``; every one would pass
        or fail the same checks, so they run as one engine pass.
        """
        self.commands += commands - 1
        if self.state != PlatformState.WORKING:
            return SevRet.INVALID_PLATFORM_STATE
        if src % 16 or dst % 16:
            return SevRet.INVALID_ADDRESS
        if length % 16:
            return SevRet.INVALID_LEN
        guest = self.guests.get(handle)
        if guest is None:
            return SevRet.INVALID_GUEST
        if guest.policy & Policy.NODBG:
            return SevRet.POLICY_FAILURE
        if guest.inactive:
            return SevRet.INACTIVE
        if length:
            if encrypt:
                self.mc.write(dst, self.mc.read(src, length), guest.asid)
            else:
                self.mc.write(dst, self.mc.read(src, length, guest.asid))
        return SevRet.SUCCESS

    # -- helpers --------------------------------------------------------------------------
    def _guest(self, handle: int) -> GuestContext | None:
        return self.guests.get(handle) if 1 <= handle <= SEV_GUEST_COUNT_MAX else None

    def identity(self) -> _Identity:
        """The platform's keys (generated on first use)."""
        return self._identity()

    def restore_identity(self, **keys) -> None:
        """Reuse a stored identity (:mod:`sevmon.model.platform_store`): the PSP's NV storage."""
        self._ident = _Identity(self._rng, keys)

    def _identity(self) -> _Identity:
        if self._ident is None:
            self._ident = _Identity(self._rng)
        return self._ident

    @staticmethod
    def _put(buf: bytearray, struct, values: dict) -> None:
        buf[:struct.sizeof()] = struct.build(values)

    # -- platform commands ----------------------------------------------------------------
    def _init(self, buf: bytearray) -> SevRet:
        if self.state != PlatformState.UNINIT:
            return SevRet.INVALID_PLATFORM_STATE
        p = SevDataInit.parse(bytes(buf).ljust(SevDataInit.sizeof(), b"\0"))
        if p.flags & ~_INIT_FLAG_ES or p.reserved:
            return SevRet.INVALID_CONFIG
        self.config_flags = p.flags
        # INIT marks every ASID invalid on every core: each needs WBINVD + DF_FLUSH first.
        self._dirty = set(range(1, self.max_asid + 1))
        self._allocated.clear()
        self._in_use.clear()
        self.state = PlatformState.INIT
        return SevRet.SUCCESS

    def _shutdown(self, buf: bytearray) -> SevRet:
        self.guests.clear()
        self.mc.clear()
        self._dirty.clear()
        self._allocated.clear()
        self._in_use.clear()
        self.config_flags = 0
        self.state = PlatformState.UNINIT
        return SevRet.SUCCESS

    def _factory_reset(self, buf: bytearray) -> SevRet:
        if self.state != PlatformState.UNINIT:
            return SevRet.INVALID_PLATFORM_STATE
        if self._ident is not None:
            self._ident.renew()
        return SevRet.SUCCESS

    def _platform_status(self, buf: bytearray) -> SevRet:
        init = self.state != PlatformState.UNINIT
        flags = SEV_STATUS_FLAGS_CONFIG_ES if init and self.config_flags & _INIT_FLAG_ES else 0
        self._put(buf, SevUserDataStatus, dict(
            api_major=API_MAJOR, api_minor=API_MINOR, state=self.state, flags=flags,
            build=BUILD_ID, guest_count=self.guest_count if init else 0))
        return SevRet.SUCCESS

    def _df_flush(self, buf: bytearray) -> SevRet:
        if self.state == PlatformState.UNINIT:
            return SevRet.INVALID_PLATFORM_STATE
        self._dirty.clear()  # the kernel did WBINVD on all CPUs before asking
        return SevRet.SUCCESS

    def _pdh_cert_export(self, buf: bytearray) -> SevRet:
        if self.state == PlatformState.UNINIT:
            return SevRet.INVALID_PLATFORM_STATE
        p = SevDataPdhCertExport.parse(bytes(buf).ljust(SevDataPdhCertExport.sizeof(), b"\0"))
        status = SevRet.SUCCESS
        if p.pdh_cert_len < SEV_CERT_LEN or p.cert_chain_len < 3 * SEV_CERT_LEN:
            status = SevRet.INVALID_LEN  # and tell the caller the sizes it needs
        else:
            ident = self._identity()
            self.mc.write(p.pdh_cert_address, ident.pdh_cert)
            self.mc.write(p.cert_chain_address, ident.pek_cert + ident.oca_cert + ident.cek_cert)
        self._put(buf, SevDataPdhCertExport, dict(p, pdh_cert_len=SEV_CERT_LEN, cert_chain_len=3 * SEV_CERT_LEN))
        return status

    def _get_id(self, buf: bytearray) -> SevRet:
        p = SevDataGetId.parse(bytes(buf).ljust(SevDataGetId.sizeof(), b"\0"))
        if p.len < GET_ID_LEN:
            self._put(buf, SevDataGetId, dict(p, len=GET_ID_LEN))
            return SevRet.INVALID_LEN
        self.mc.write(p.address, self._identity().chip_id)
        self._put(buf, SevDataGetId, dict(p, len=GET_ID_LEN))
        return SevRet.SUCCESS

    # -- guest management -----------------------------------------------------------------
    def _activate(self, buf: bytearray) -> SevRet:
        if self.state != PlatformState.WORKING:
            return SevRet.INVALID_PLATFORM_STATE
        p = SevDataActivate.parse(bytes(buf[:SevDataActivate.sizeof()]))
        guest = self._guest(p.handle)
        if guest is None:
            return SevRet.INVALID_GUEST
        asid = p.asid
        if asid == 0 or asid > self.max_asid:
            return SevRet.INVALID_ASID
        if asid in self._in_use or asid in self._allocated:
            return SevRet.ASID_OWNED
        if not guest.inactive:
            return SevRet.ACTIVE
        if guest.state == GuestState.SENT:
            return SevRet.INVALID_GUEST_STATE
        if asid in self._dirty:
            return SevRet.DFFLUSH_REQUIRED
        self.mc.install_key(asid, guest.vek)
        guest.asid = asid
        if guest.state in (GuestState.RUNNING, GuestState.SUPDATE):
            guest.active = True
            self._in_use.add(asid)
        else:
            guest.pending = True
            self._allocated.add(asid)
        return SevRet.SUCCESS

    def _deactivate(self, buf: bytearray) -> SevRet:
        if self.state != PlatformState.WORKING:
            return SevRet.INVALID_PLATFORM_STATE
        guest = self._guest(SevDataHandle.parse(bytes(buf[:4])).handle)
        if guest is None:
            return SevRet.INVALID_GUEST
        if guest.inactive:
            return SevRet.INACTIVE
        asid = guest.asid
        if asid in self._allocated:   # never ran: back to clean
            self._allocated.discard(asid)
        if asid in self._in_use:      # ran: dirty until WBINVD + DF_FLUSH
            self._in_use.discard(asid)
            self._dirty.add(asid)
        guest.asid = 0
        guest.pending = guest.active = False  # the UMC slot keeps the stale key
        return SevRet.SUCCESS

    def _decommission(self, buf: bytearray) -> SevRet:
        if self.state != PlatformState.WORKING:
            return SevRet.INVALID_PLATFORM_STATE
        guest = self._guest(SevDataHandle.parse(bytes(buf[:4])).handle)
        if guest is None:
            return SevRet.INVALID_GUEST
        if guest.asid and not guest.inactive:
            return SevRet.ACTIVE
        del self.guests[guest.handle]
        if not self.guests:
            self.state = PlatformState.INIT
        return SevRet.SUCCESS

    def _guest_status(self, buf: bytearray) -> SevRet:
        if self.state not in (PlatformState.INIT, PlatformState.WORKING):
            return SevRet.INVALID_PLATFORM_STATE
        p = SevDataGuestStatus.parse(bytes(buf).ljust(SevDataGuestStatus.sizeof(), b"\0"))
        guest = self._guest(p.handle)
        if guest is None:  # an unknown handle is not an error: state INVALID (0)
            self._put(buf, SevDataGuestStatus, dict(handle=p.handle, policy=p.policy, asid=p.asid, state=0))
            return SevRet.SUCCESS
        self._put(buf, SevDataGuestStatus, dict(
            handle=p.handle, policy=guest.policy, asid=guest.asid, state=guest.state))
        return SevRet.SUCCESS

    # -- launch ---------------------------------------------------------------------------
    def _launch_start(self, buf: bytearray) -> SevRet:
        if self.state not in (PlatformState.INIT, PlatformState.WORKING):
            return SevRet.INVALID_PLATFORM_STATE
        p = SevDataLaunchStart.parse(bytes(buf[:SevDataLaunchStart.sizeof()]))
        tek = tik = bytes(16)  # no DH certificate: no channel, all-zero transport keys
        if p.dh_cert_address:
            if p.session_len != SESSION_LEN or p.dh_cert_len != SEV_CERT_LEN:
                return SevRet.INVALID_LEN
            try:
                tek, tik = open_server(self._identity().pdh, self.mc.read(p.dh_cert_address, SEV_CERT_LEN),
                                       self.mc.read(p.session_address, SESSION_LEN), p.policy)
            except ChannelError as e:
                return e.status
        if p.handle == 0:
            vek = MemoryKey(self._rng(32))
        else:
            shared = self._guest(p.handle)
            if shared is None:
                return SevRet.INVALID_GUEST
            if p.policy != shared.policy or shared.policy & Policy.NOKS:
                return SevRet.POLICY_FAILURE
            vek = shared.vek
        handle = next((h for h in range(1, SEV_GUEST_COUNT_MAX + 1) if h not in self.guests), None)
        if handle is None:
            return SevRet.RESOURCE_LIMIT
        es = bool(p.policy & Policy.ES)
        if es and not self.config_flags & _INIT_FLAG_ES:
            return SevRet.UNSUPPORTED
        self.guests[handle] = GuestContext(handle=handle, policy=p.policy, vek=vek, es=es, tek=tek, tik=tik)
        self.state = PlatformState.WORKING
        self._put(buf, SevDataLaunchStart, dict(p, handle=handle))
        return SevRet.SUCCESS

    def _launch_update(self, buf: bytearray, *, vmsa: bool) -> SevRet:
        p = SevDataLaunchUpdate.parse(bytes(buf[:SevDataLaunchUpdate.sizeof()]))
        if vmsa and p.len != VMSA_SIZE:
            return SevRet.INVALID_LEN
        if self.state != PlatformState.WORKING:
            return SevRet.INVALID_PLATFORM_STATE
        guest = self._guest(p.handle)
        if guest is None:
            return SevRet.INVALID_GUEST
        if guest.state != GuestState.LUPDATE:
            return SevRet.INVALID_GUEST_STATE
        if vmsa and not guest.es:
            return SevRet.UNSUPPORTED
        if guest.inactive:
            return SevRet.INACTIVE
        if p.address % 16:
            return SevRet.INVALID_ADDRESS
        if p.len % 16 or p.len == 0:
            return SevRet.INVALID_LEN
        plain = self.mc.read(p.address, p.len)
        guest.ld.update(plain)  # measured unaltered, in call order: split-independent
        self.mc.write(p.address, plain, guest.asid)
        return SevRet.SUCCESS

    def _launch_measure(self, buf: bytearray) -> SevRet:
        if self.state != PlatformState.WORKING:
            return SevRet.INVALID_PLATFORM_STATE
        p = SevDataLaunchUpdate.parse(bytes(buf[:SevDataLaunchUpdate.sizeof()]))
        guest = self._guest(p.handle)
        if guest is None:
            return SevRet.INVALID_GUEST
        if guest.state != GuestState.LUPDATE:
            return SevRet.INVALID_GUEST_STATE
        if p.len < MEASUREMENT_LEN:  # tells the caller the size it needs
            self._put(buf, SevDataLaunchUpdate, dict(p, len=MEASUREMENT_LEN))
            return SevRet.INVALID_LEN
        digest = guest.ld.digest()
        mnonce = self._rng(16)
        measure = launch_measurement(guest.tik, API_MAJOR, API_MINOR, BUILD_ID, guest.policy, digest, mnonce)
        self.mc.write(p.address, measure + mnonce)
        guest.measurement = measure
        guest.launch_digest = digest
        guest.state = GuestState.LSECRET
        return SevRet.SUCCESS

    def _launch_secret(self, buf: bytearray) -> SevRet:
        if self.state != PlatformState.WORKING:
            return SevRet.INVALID_PLATFORM_STATE
        p = SevDataLaunchSecret.parse(bytes(buf[:SevDataLaunchSecret.sizeof()]))
        guest = self._guest(p.handle)
        if guest is None:
            return SevRet.INVALID_GUEST
        if p.guest_address % 16:
            return SevRet.INVALID_ADDRESS
        if (p.hdr_len != PACKET_HEADER_LEN or p.guest_len % 16 or p.guest_len == 0
                or p.guest_len > SEV_SCRATCH_BUF_LEN or p.guest_len != p.trans_len):
            return SevRet.INVALID_LEN
        if guest.state != GuestState.LSECRET:
            return SevRet.INVALID_GUEST_STATE
        if guest.inactive:
            return SevRet.INACTIVE
        hdr = PacketHeader.parse(self.mc.read(p.hdr_address, PACKET_HEADER_LEN))
        trans = self.mc.read(p.trans_address, p.trans_len)
        mac = _secret_mac(guest.tik, hdr.flags, hdr.iv, p.guest_len, p.trans_len, trans, guest.measurement)
        if not hmac.compare_digest(mac, hdr.mac):
            return SevRet.BAD_MEASUREMENT
        secret = Cipher(algorithms.AES(guest.tek), modes.CTR(hdr.iv)).decryptor().update(trans)
        if hdr.flags & PACKET_FLAG_COMPRESSED:
            return SevRet.UNSUPPORTED
        self.mc.write(p.guest_address, secret, guest.asid)
        return SevRet.SUCCESS

    def _launch_finish(self, buf: bytearray) -> SevRet:
        if self.state != PlatformState.WORKING:
            return SevRet.INVALID_PLATFORM_STATE
        guest = self._guest(SevDataHandle.parse(bytes(buf[:4])).handle)
        if guest is None:
            return SevRet.INVALID_GUEST
        if guest.state != GuestState.LSECRET:
            return SevRet.INVALID_GUEST_STATE
        if guest.pending:  # the bound ASID becomes valid for VMRUN
            guest.pending, guest.active = False, True
            self._allocated.discard(guest.asid)
            self._in_use.add(guest.asid)
        # The channel is closed: TEK, TIK and the stored measurement are erased; LD cleared.
        guest.tek = guest.tik = bytes(16)
        guest.measurement = bytes(32)
        guest.ld = None
        guest.state = GuestState.RUNNING
        return SevRet.SUCCESS

    def _attestation_report(self, buf: bytearray) -> SevRet:
        if self.state != PlatformState.WORKING:
            return SevRet.INVALID_PLATFORM_STATE
        p = SevDataAttestationReport.parse(bytes(buf[:SevDataAttestationReport.sizeof()]))
        guest = self._guest(p.handle)
        if guest is None:
            return SevRet.INVALID_GUEST
        if guest.state not in (GuestState.LSECRET, GuestState.RUNNING, GuestState.SUPDATE, GuestState.SENT):
            return SevRet.INVALID_GUEST_STATE
        if p.len < ATTESTATION_REPORT_LEN:
            self._put(buf, SevDataAttestationReport, dict(p, len=ATTESTATION_REPORT_LEN))
            return SevRet.INVALID_LEN
        body = dict(mnonce=p.mnonce, launch_digest=guest.launch_digest, policy=guest.policy,
                    sig_usage=CERT_USAGE_PEK, sig_algo=CERT_ALGO_ECDSA_SHA256)
        signed = AttestationReport.build(body)[:ATTESTATION_SIGNED_LEN]
        r, s = utils.decode_dss_signature(self._identity().pek.sign(signed, ec.ECDSA(hashes.SHA256())))
        report = AttestationReport.build(dict(body, sig_r=r.to_bytes(72, "little"), sig_s=s.to_bytes(72, "little")))
        self.mc.write(p.address, report)
        self._put(buf, SevDataAttestationReport, dict(p, len=ATTESTATION_REPORT_LEN))
        return SevRet.SUCCESS

    # -- debug ----------------------------------------------------------------------------
    def _dbg(self, buf: bytearray, *, encrypt: bool) -> SevRet:
        p = SevDataDbg.parse(bytes(buf).ljust(SevDataDbg.sizeof(), b"\0"))
        return self.dbg_crypt(encrypt=encrypt, handle=p.handle, src=p.src_addr, dst=p.dst_addr, length=p.len)
