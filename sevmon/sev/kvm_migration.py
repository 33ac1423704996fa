"""KVM's SEND_* / RECEIVE_* argument structs (``include/uapi/linux/kvm.h``), shared by the VMM side
(:mod:`sevmon.sev.migration_vmm`) and the simulated kernel (:mod:`sevmon.model.sim_migration`)."""

from __future__ import annotations

from construct import Default, Int32ul, Int64ul, Struct

from .abi import KvmSevLaunchSecret, KvmSevLaunchStart


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
