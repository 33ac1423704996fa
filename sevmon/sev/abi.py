"""The binary interface of legacy SEV, byte-exact (reference: sev-api.md §1, §3).

Two families of layouts live here, because the model crosses both boundaries:

* the Linux uapi (``kvm_sev_*``, ``kvm_enc_region``, ``sev_issue_cmd``): what a VMM packs
  into user memory and passes by pointer through ``KVM_MEMORY_ENCRYPT_OP`` / ``SEV_ISSUE_CMD``.
  These use C natural alignment, hence the explicit ``pad*`` fields.
* the PSP mailbox buffers (``sev_data_*``): ``__packed`` structs the kernel hands to the
  firmware, carrying *system physical* addresses.

Every field has a zero default so ``X.build({...})`` names only what matters.
"""

from __future__ import annotations

import enum
import struct as stdstruct

from construct import Bytes, Container, Default, Int8ul, Int32ul, Int64ul, Struct

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = ~(PAGE_SIZE - 1)

SEV_FW_BLOB_MAX_SIZE = 0x4000   # KVM caps measure/attestation/secret blobs with it
SEV_SCRATCH_BUF_LEN = 0x5000    # firmware internal piece size; LAUNCH_SECRET guest_len limit
SEV_GUEST_COUNT_MAX = 1024      # handles 1..1024 (Genoa firmware)
MEASUREMENT_LEN = 48            # MEASURE(32) || MNONCE(16)
PACKET_HEADER_LEN = 52          # {u32 flags; u8 iv[16]; u8 mac[32]}
SESSION_LEN = 128               # sev_session_t
SEV_CERT_LEN = 2084             # sizeof(sev_cert_t) [M]
ATTESTATION_REPORT_LEN = 208    # sev_mcmd_attestation_report_t
VMSA_SIZE = PAGE_SIZE

# Channel contexts: the first byte of every HMAC the firmware computes with the TIK.
CHANNEL_CTX_SECRET = 0x01
CHANNEL_CTX_DATA = 0x02
CHANNEL_CTX_VMSA = 0x03
CHANNEL_CTX_MEASURE = 0x04

PACKET_FLAG_COMPRESSED = 0x1

CERT_USAGE_OCA = 0x1001
CERT_USAGE_PEK = 0x1002
CERT_USAGE_PDH = 0x1003
CERT_USAGE_CEK = 0x1004
CERT_USAGE_INVALID = 0x1000
CERT_ALGO_ECDSA_SHA256 = 0x002
CERT_ALGO_ECDH_SHA256 = 0x003
CERT_CURVE_P384 = 2
CERT_SIGNED_LEN = 0x414  # version .. pubkey: what each signature of a sev_cert covers
GET_ID_LEN = 64


def _u32(name):
    return name / Default(Int32ul, 0)


def _u64(name):
    return name / Default(Int64ul, 0)


def _u8(name):
    return name / Default(Int8ul, 0)


def _bytes(name, n):
    return name / Default(Bytes(n), bytes(n))


# ---------------------------------------------------------------------------------------
# ioctl numbers (x86-64 _IOC encoding)
# ---------------------------------------------------------------------------------------
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (typ << 8) | nr


def _IO(typ: int, nr: int) -> int:  # noqa: N802 - kernel macro names
    return _ioc(_IOC_NONE, typ, nr, 0)


def _IOR(typ: int, nr: int, size: int) -> int:  # noqa: N802
    return _ioc(_IOC_READ, typ, nr, size)


def _IOW(typ: int, nr: int, size: int) -> int:  # noqa: N802
    return _ioc(_IOC_WRITE, typ, nr, size)


def _IOWR(typ: int, nr: int, size: int) -> int:  # noqa: N802
    return _ioc(_IOC_READ | _IOC_WRITE, typ, nr, size)


KVMIO = 0xAE
# The OP ioctl encodes sizeof(unsigned long) = 8, not sizeof(kvm_sev_cmd).
KVM_MEMORY_ENCRYPT_OP = _IOWR(KVMIO, 0xBA, 8)
KVM_MEMORY_ENCRYPT_REG_REGION = _IOR(KVMIO, 0xBB, 16)
KVM_MEMORY_ENCRYPT_UNREG_REGION = _IOR(KVMIO, 0xBC, 16)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
SEV_ISSUE_CMD = _IOWR(ord("S"), 0x0, 16)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, 104)  # struct kvm_enable_cap
KVM_CAP_VM_COPY_ENC_CONTEXT_FROM = 197   # Linux >= 5.15: a mirror VM sharing an SEV guest's ASID and handle


# ---------------------------------------------------------------------------------------
# Linux uapi: KVM_MEMORY_ENCRYPT_OP sub-commands and their argument structs
# ---------------------------------------------------------------------------------------
class SevCmdId(enum.IntEnum):
    """``enum sev_cmd_id``: the ``id`` of a ``kvm_sev_cmd``."""

    INIT = 0
    ES_INIT = 1
    LAUNCH_START = 2
    LAUNCH_UPDATE_DATA = 3
    LAUNCH_UPDATE_VMSA = 4
    LAUNCH_SECRET = 5
    LAUNCH_MEASURE = 6
    LAUNCH_FINISH = 7
    SEND_START = 8
    SEND_UPDATE_DATA = 9
    SEND_UPDATE_VMSA = 10
    SEND_FINISH = 11
    RECEIVE_START = 12
    RECEIVE_UPDATE_DATA = 13
    RECEIVE_UPDATE_VMSA = 14
    RECEIVE_FINISH = 15
    GUEST_STATUS = 16
    DBG_DECRYPT = 17
    DBG_ENCRYPT = 18
    CERT_EXPORT = 19
    GET_ATTESTATION_REPORT = 20
    SEND_CANCEL = 21
    INIT2 = 22
    SNP_LAUNCH_START = 100
    SNP_LAUNCH_UPDATE = 101
    SNP_LAUNCH_FINISH = 102
    SNP_ENABLE_REQ_CERTS = 103


KvmSevCmd = Struct(_u32("id"), _u32("pad0"), _u64("data"), _u32("error"), _u32("sev_fd"))
KvmSevLaunchStart = Struct(
    _u32("handle"), _u32("policy"), _u64("dh_uaddr"), _u32("dh_len"), _u32("pad0"),
    _u64("session_uaddr"), _u32("session_len"), _u32("pad1"),
)
KvmSevLaunchUpdateData = Struct(_u64("uaddr"), _u32("len"), _u32("pad0"))
KvmSevLaunchSecret = Struct(
    _u64("hdr_uaddr"), _u32("hdr_len"), _u32("pad0"),
    _u64("guest_uaddr"), _u32("guest_len"), _u32("pad1"),
    _u64("trans_uaddr"), _u32("trans_len"), _u32("pad2"),
)
KvmSevLaunchMeasure = Struct(_u64("uaddr"), _u32("len"), _u32("pad0"))
KvmSevGuestStatus = Struct(_u32("handle"), _u32("policy"), _u32("state"))
KvmSevDbg = Struct(_u64("src_uaddr"), _u64("dst_uaddr"), _u32("len"), _u32("pad0"))
KvmSevAttestationReport = Struct(_bytes("mnonce", 16), _u64("uaddr"), _u32("len"), _u32("pad0"))
KvmEncRegion = Struct(_u64("addr"), _u64("size"))


# ---------------------------------------------------------------------------------------
# /dev/sev
# ---------------------------------------------------------------------------------------
class SevUserCmd(enum.IntEnum):
    """``SEV_ISSUE_CMD`` command numbers (``sev_issue_cmd.cmd``)."""

    FACTORY_RESET = 0
    PLATFORM_STATUS = 1
    PEK_GEN = 2
    PEK_CSR = 3
    PDH_GEN = 4
    PDH_CERT_EXPORT = 5
    PEK_CERT_IMPORT = 6
    GET_ID = 7
    GET_ID2 = 8
    SNP_PLATFORM_STATUS = 9
    SNP_COMMIT = 10
    SNP_SET_CONFIG = 11
    SNP_VLEK_LOAD = 12
    MAX = 13


SevIssueCmd = Struct(_u32("cmd"), _u64("data"), _u32("error"))  # packed, 16 B
# Same 12 bytes as the firmware's PLATFORM_STATUS buffer: flags bit0 = owner, bit8 = CONFIG.ES.
SevUserDataPdhCertExport = Struct(
    _u64("pdh_cert_address"), _u32("pdh_cert_len"), _u64("cert_chain_address"), _u32("cert_chain_len"),
)  # packed, 24 B
SevUserDataGetId2 = Struct(_u64("address"), _u32("length"))  # packed, 12 B
SevUserDataStatus = Struct(
    _u8("api_major"), _u8("api_minor"), _u8("state"), _u32("flags"), _u8("build"), _u32("guest_count"),
)
SEV_STATUS_FLAGS_OWNER = 0x0001
SEV_STATUS_FLAGS_CONFIG_ES = 0x0100


# ---------------------------------------------------------------------------------------
# PSP mailbox: firmware command ids and (packed) command buffers
# ---------------------------------------------------------------------------------------
class FwCmd(enum.IntEnum):
    """Firmware command ids (``SEV_CMD_*``), what the kernel writes to the PSP mailbox."""

    INIT = 0x01
    SHUTDOWN = 0x02
    FACTORY_RESET = 0x03
    PLATFORM_STATUS = 0x04
    PEK_GEN = 0x05
    PEK_CSR = 0x06
    PEK_CERT_IMPORT = 0x07
    PDH_CERT_EXPORT = 0x08
    PDH_GEN = 0x09
    DF_FLUSH = 0x0A
    DOWNLOAD_FIRMWARE = 0x0B
    GET_ID = 0x0C
    INIT_EX = 0x0D
    DECOMMISSION = 0x20
    ACTIVATE = 0x21
    DEACTIVATE = 0x22
    GUEST_STATUS = 0x23
    COPY = 0x24
    ACTIVATE_EX = 0x25
    LAUNCH_START = 0x30
    LAUNCH_UPDATE_DATA = 0x31
    LAUNCH_UPDATE_VMSA = 0x32
    LAUNCH_MEASURE = 0x33
    LAUNCH_UPDATE_SECRET = 0x34
    LAUNCH_FINISH = 0x35
    ATTESTATION_REPORT = 0x36
    SEND_START = 0x40
    SEND_UPDATE_DATA = 0x41
    SEND_UPDATE_VMSA = 0x42
    SEND_FINISH = 0x43
    SEND_CANCEL = 0x44
    RECEIVE_START = 0x50
    RECEIVE_UPDATE_DATA = 0x51
    RECEIVE_UPDATE_VMSA = 0x52
    RECEIVE_FINISH = 0x53
    DBG_DECRYPT = 0x60
    DBG_ENCRYPT = 0x61


SEV_INIT_FLAGS_SEV_ES = 0x1  # sev_data_init.flags bit 0: CONFIG.ES (the platform may run SEV-ES guests)
SevDataInit = Struct(_u32("flags"), _u32("reserved"), _u64("tmr_address"), _u32("tmr_len"))
SevDataDbg = Struct(_u32("handle"), _u32("reserved"), _u64("src_addr"), _u64("dst_addr"), _u32("len"))
SevDataGuestStatus = Struct(_u32("handle"), _u32("policy"), _u32("asid"), _u8("state"))
SevDataLaunchStart = Struct(
    _u32("handle"), _u32("policy"), _u64("dh_cert_address"), _u32("dh_cert_len"), _u32("reserved"),
    _u64("session_address"), _u32("session_len"),
)
# LAUNCH_UPDATE_DATA, LAUNCH_UPDATE_VMSA and LAUNCH_MEASURE share this shape.
SevDataLaunchUpdate = Struct(_u32("handle"), _u32("reserved"), _u64("address"), _u32("len"))
SevDataLaunchSecret = Struct(
    _u32("handle"), _u32("reserved"),
    _u64("hdr_address"), _u32("hdr_len"), _u32("reserved2"),
    _u64("guest_address"), _u32("guest_len"), _u32("reserved3"),
    _u64("trans_address"), _u32("trans_len"),
)
SevDataActivate = Struct(_u32("handle"), _u32("asid"))
SevDataHandle = Struct(_u32("handle"))  # DEACTIVATE, DECOMMISSION, LAUNCH_FINISH
SevDataPdhCertExport = Struct(
    _u64("pdh_cert_address"), _u32("pdh_cert_len"), _u32("reserved"), _u64("cert_chain_address"),
    _u32("cert_chain_len"),
)
SevDataGetId = Struct(_u64("address"), _u32("len"))
SevDataAttestationReport = Struct(
    _u32("handle"), _u32("reserved"), _u64("address"), _bytes("mnonce", 16), _u32("len"),
)

# What the firmware reads or writes in memory for the launch/attestation commands.
PacketHeader = Struct(_u32("flags"), _bytes("iv", 16), _bytes("mac", 32))
AttestationReport = Struct(
    _bytes("mnonce", 16), _bytes("launch_digest", 32), _u32("policy"),
    _u32("sig_usage"), _u32("sig_algo"), _u32("reserved"),
    _bytes("sig_r", 72), _bytes("sig_s", 72),  # ECDSA P-384 r, s little-endian, zero-padded
)
ATTESTATION_SIGNED_LEN = 52  # the signature covers mnonce || launch_digest || policy


# ---------------------------------------------------------------------------------------
# Status codes (enum sev_ret_code) and QEMU's text for them
# ---------------------------------------------------------------------------------------
class SevRet(enum.IntEnum):
    """Firmware status codes; ``NO_FW_CALL`` is Linux's marker for "never reached the PSP"."""

    NO_FW_CALL = -1
    SUCCESS = 0x00
    INVALID_PLATFORM_STATE = 0x01
    INVALID_GUEST_STATE = 0x02
    INVALID_CONFIG = 0x03
    INAVLID_CONFIG = 0x03  # the uapi's historic spelling, kept as an alias
    INVALID_LEN = 0x04
    ALREADY_OWNED = 0x05
    INVALID_CERTIFICATE = 0x06
    POLICY_FAILURE = 0x07
    INACTIVE = 0x08
    INVALID_ADDRESS = 0x09
    BAD_SIGNATURE = 0x0A
    BAD_MEASUREMENT = 0x0B
    ASID_OWNED = 0x0C
    INVALID_ASID = 0x0D
    WBINVD_REQUIRED = 0x0E
    DFFLUSH_REQUIRED = 0x0F
    INVALID_GUEST = 0x10
    INVALID_COMMAND = 0x11
    ACTIVE = 0x12
    HWSEV_RET_PLATFORM = 0x13
    HWSEV_RET_UNSAFE = 0x14
    UNSUPPORTED = 0x15
    INVALID_PARAM = 0x16
    RESOURCE_LIMIT = 0x17
    SECURE_DATA_INVALID = 0x18
    INVALID_PAGE_SIZE = 0x19
    INVALID_PAGE_STATE = 0x1A
    INVALID_MDATA_ENTRY = 0x1B
    INVALID_PAGE_OWNER = 0x1C
    AEAD_OFLOW = 0x1D
    EXIT_RING_BUFFER = 0x1F
    RMP_INIT_REQUIRED = 0x20
    BAD_SVN = 0x21
    BAD_VERSION = 0x22
    SHUTDOWN_REQUIRED = 0x23
    UPDATE_FAILED = 0x24
    RESTORE_REQUIRED = 0x25
    RMP_INITIALIZATION_FAILED = 0x26
    INVALID_KEY = 0x27


# QEMU target/i386/sev.c sev_fw_errlist, indexed by status.
SEV_FW_ERRLIST = (
    "",
    "Platform state is invalid",
    "Guest state is invalid",
    "Platform configuration is invalid",
    "Buffer too small",
    "Platform is already owned",
    "Certificate is invalid",
    "Policy is not allowed",
    "Guest is not active",
    "Invalid address",
    "Bad signature",
    "Bad measurement",
    "Asid is already owned",
    "Invalid ASID",
    "WBINVD is required",
    "DF_FLUSH is required",
    "Guest handle is invalid",
    "Invalid command",
    "Guest is active",
    "Hardware error",
    "Hardware unsafe",
    "Feature not supported",
    "Invalid parameter",
    "Required firmware resource depleted",
    "Part-specific integrity check failure",
)


def fw_error_to_str(code: int) -> str:
    """QEMU's ``fw_error_to_str``: the table entry, or "unknown error" outside it."""
    if code < 0 or code >= len(SEV_FW_ERRLIST):
        return "unknown error"
    return SEV_FW_ERRLIST[code]


qemu_fw_error_str = fw_error_to_str  # the name the command layer imports


# ---------------------------------------------------------------------------------------
# State machines and policy
# ---------------------------------------------------------------------------------------
class PlatformState(enum.IntEnum):
    UNINIT = 0
    INIT = 1
    WORKING = 2


class GuestState(enum.IntEnum):
    """Firmware guest states; note SUPDATE=4, RUPDATE=5 (the KDOC list has them swapped)."""

    UNINIT = 0  # also INVALID: a free handle slot
    LUPDATE = 1
    LSECRET = 2
    RUNNING = 3
    SUPDATE = 4
    RUPDATE = 5
    SENT = 6


# QEMU's SevState names (query-sev "state"), keyed by the firmware state they mirror.
SEV_STATE_NAMES = {
    GuestState.UNINIT: "uninit",
    GuestState.LUPDATE: "launch-update",
    GuestState.LSECRET: "launch-secret",
    GuestState.RUNNING: "running",
    GuestState.SUPDATE: "send-update",
    GuestState.RUPDATE: "receive-update",
}


class Policy(enum.IntFlag):
    """Guest policy bits (u32, little-endian on the wire)."""

    NODBG = 1 << 0
    NOKS = 1 << 1
    ES = 1 << 2
    NOSEND = 1 << 3
    DOMAIN = 1 << 4
    SEV = 1 << 5


POLICY_RESERVED_MASK = 0xFFC0
QEMU_DEFAULT_POLICY = 0x1  # QEMU's sev-guest default: debugging disabled


def policy_api_version(policy: int) -> tuple[int, int]:
    """The (major, minor) minimum firmware version a SEND target must have."""
    return (policy >> 16) & 0xFF, (policy >> 24) & 0xFF


class _Compiled:
    """A construct ``Struct`` compiled to generated code, with its fixed size computed once.

    Every DBG ioctl packs and unpacks several of these structs on the way through the
    kernel and the firmware, so the cold-walk cost of the simulated platform is dominated
    by construct's interpretive parse/build/sizeof unless they are compiled. The layout
    stays available as ``.struct`` / ``.subcons`` for introspection and tests.
    """

    def __init__(self, struct: Struct):
        self.struct = struct
        self.subcons = struct.subcons
        self._compiled = struct.compile()
        self._size = struct.sizeof()
        self.parse = self._compiled.parse
        self.build = self._compiled.build
        fields = _int_fields(struct)
        if fields is not None:  # integers only: the standard library's struct packs them (what the DBG path uses)
            self._fields = fields
            self._names = tuple(name for name, _ in fields)
            self._packer = stdstruct.Struct("<" + "".join(_INT_FORMATS[sc.subcon.subcon] for sc in struct.subcons))
            self.parse = self._parse_ints
            self.build = self._build_ints

    def _parse_ints(self, data):
        if len(data) < self._size:
            return self._compiled.parse(data)  # construct's own error for a short buffer
        return Container(zip(self._names, self._packer.unpack_from(data), strict=True))

    def _build_ints(self, values):
        get = values.get
        try:
            return self._packer.pack(*[default if (v := get(name)) is None else v for name, default in self._fields])
        except (stdstruct.error, TypeError):
            return self._compiled.build(values)  # construct's own error for a bad value

    def sizeof(self, **_context) -> int:
        return self._size


_INT_FORMATS = {Int8ul: "B", Int32ul: "I", Int64ul: "Q"}


def _int_fields(struct: Struct) -> list[tuple[str, int]] | None:
    """``(name, default)`` of each field when every field is a little-endian integer with a default (``_u8``,
    ``_u32``, ``_u64``), else None."""
    out = []
    for sc in struct.subcons:
        inner = getattr(sc, "subcon", None)
        if not isinstance(inner, Default) or inner.subcon not in _INT_FORMATS or not isinstance(inner.value, int):
            return None
        out.append((sc.name, inner.value))
    return out


for _name, _obj in list(globals().items()):
    if isinstance(_obj, Struct):
        globals()[_name] = _Compiled(_obj)
del _name, _obj


# struct kvm_enable_cap (KVM_ENABLE_CAP on a VM fd)
KvmEnableCap = Struct(_u32("cap"), _u32("flags"), _u64("arg0"), _u64("arg1"), _u64("arg2"), _u64("arg3"),
                      _bytes("pad", 64))
