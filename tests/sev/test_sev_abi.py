"""Byte-exact layouts, ioctl numbers and code tables against sev-api.md §1 and §7.6."""

from __future__ import annotations

import pytest
from construct import Struct

from sevmon.sev import abi

SIZES = {
    "KvmSevCmd": 24, "KvmSevLaunchStart": 40, "KvmSevLaunchUpdateData": 16, "KvmSevLaunchSecret": 48,
    "KvmSevLaunchMeasure": 16, "KvmSevGuestStatus": 12, "KvmSevDbg": 24, "KvmSevAttestationReport": 32,
    "KvmEncRegion": 16, "SevIssueCmd": 16, "SevUserDataStatus": 12,
    "SevDataDbg": 28, "SevDataGuestStatus": 13, "SevDataLaunchStart": 36, "SevDataLaunchUpdate": 20,
    "SevDataLaunchSecret": 52, "SevDataActivate": 8, "SevDataHandle": 4, "SevDataAttestationReport": 36,
    "PacketHeader": 52, "AttestationReport": 208,
}

OFFSETS = {
    "KvmSevCmd": {"id": 0, "pad0": 4, "data": 8, "error": 16, "sev_fd": 20},
    "KvmSevLaunchStart": {"handle": 0, "policy": 4, "dh_uaddr": 8, "dh_len": 16, "session_uaddr": 24,
                          "session_len": 32},
    "KvmSevLaunchUpdateData": {"uaddr": 0, "len": 8},
    "KvmSevLaunchSecret": {"hdr_uaddr": 0, "hdr_len": 8, "guest_uaddr": 16, "guest_len": 24, "trans_uaddr": 32,
                           "trans_len": 40},
    "KvmSevLaunchMeasure": {"uaddr": 0, "len": 8},
    "KvmSevGuestStatus": {"handle": 0, "policy": 4, "state": 8},
    "KvmSevDbg": {"src_uaddr": 0, "dst_uaddr": 8, "len": 16},
    "KvmSevAttestationReport": {"mnonce": 0, "uaddr": 16, "len": 24},
    "SevIssueCmd": {"cmd": 0, "data": 4, "error": 12},
    "SevUserDataStatus": {"api_major": 0, "api_minor": 1, "state": 2, "flags": 3, "build": 7, "guest_count": 8},
    "SevDataDbg": {"handle": 0, "src_addr": 8, "dst_addr": 16, "len": 24},
    "SevDataGuestStatus": {"handle": 0, "policy": 4, "asid": 8, "state": 12},
    "SevDataLaunchStart": {"handle": 0, "policy": 4, "dh_cert_address": 8, "dh_cert_len": 16,
                           "session_address": 24, "session_len": 32},
    "SevDataLaunchSecret": {"hdr_address": 8, "hdr_len": 16, "guest_address": 24, "guest_len": 32,
                            "trans_address": 40, "trans_len": 48},
}


def offsets(struct: Struct) -> dict[str, int]:
    out, pos = {}, 0
    for sc in struct.subcons:
        out[sc.name] = pos
        pos += sc.sizeof()
    return out


@pytest.mark.parametrize("name,size", SIZES.items())
def test_struct_sizes(name, size):
    assert getattr(abi, name).sizeof() == size


@pytest.mark.parametrize("name", OFFSETS)
def test_struct_offsets(name):
    got = offsets(getattr(abi, name))
    for field, off in OFFSETS[name].items():
        assert got[field] == off, (name, field)


def test_build_is_little_endian_and_defaults_zero():
    raw = abi.KvmSevDbg.build(dict(src_uaddr=0x1122334455667788, len=0x10))
    assert raw == bytes.fromhex("8877665544332211") + bytes(8) + bytes.fromhex("10000000") + bytes(4)


def test_ioctl_numbers():
    assert abi.KVM_MEMORY_ENCRYPT_OP == 0xC008AEBA
    assert abi.KVM_MEMORY_ENCRYPT_REG_REGION == 0x8010AEBB
    assert abi.KVM_MEMORY_ENCRYPT_UNREG_REGION == 0x8010AEBC
    assert abi.SEV_ISSUE_CMD == 0xC0105300


def test_cmd_ids_match_uapi():
    ids = {m.name: m.value for m in abi.SevCmdId}
    assert ids["INIT"] == 0 and ids["LAUNCH_START"] == 2 and ids["LAUNCH_MEASURE"] == 6
    assert ids["GUEST_STATUS"] == 16 and ids["DBG_DECRYPT"] == 17 and ids["DBG_ENCRYPT"] == 18
    assert ids["GET_ATTESTATION_REPORT"] == 20 and ids["INIT2"] == 22 and ids["SNP_LAUNCH_START"] == 100
    assert sorted(ids.values()) == [*range(23), 100, 101, 102, 103]
    assert abi.FwCmd.DBG_DECRYPT == 0x60 and abi.FwCmd.DBG_ENCRYPT == 0x61 and abi.FwCmd.LAUNCH_UPDATE_SECRET == 0x34


def test_status_codes_and_qemu_text():
    assert abi.SevRet.POLICY_FAILURE == 7 and abi.SevRet.INVALID_GUEST == 0x10 and abi.SevRet.NO_FW_CALL == -1
    assert abi.SevRet.INAVLID_CONFIG is abi.SevRet.INVALID_CONFIG
    assert abi.SevRet.SECURE_DATA_INVALID == 0x18 and abi.SevRet.INVALID_KEY == 0x27
    assert abi.fw_error_to_str(4) == "Buffer too small"
    assert abi.fw_error_to_str(7) == "Policy is not allowed"
    assert abi.fw_error_to_str(8) == "Guest is not active"
    assert abi.fw_error_to_str(16) == "Guest handle is invalid"
    assert abi.fw_error_to_str(0x18) == "Part-specific integrity check failure"
    assert abi.fw_error_to_str(0x19) == abi.fw_error_to_str(-1) == "unknown error"


def test_states_and_policy():
    assert [s.value for s in abi.GuestState] == list(range(7))
    assert abi.GuestState.SUPDATE == 4 and abi.GuestState.RUPDATE == 5 and abi.GuestState.SENT == 6
    assert [s.value for s in abi.PlatformState] == [0, 1, 2]
    assert abi.SEV_STATE_NAMES[abi.GuestState.RUPDATE] == "receive-update"
    assert abi.Policy.NODBG == 1 and abi.Policy.SEV == 0x20 and abi.QEMU_DEFAULT_POLICY == 1
    assert abi.policy_api_version(0x3701_0000) == (1, 0x37)
