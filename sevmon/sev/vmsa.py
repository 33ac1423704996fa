"""The SEV-ES VMSA a vCPU starts from: the page LAUNCH_UPDATE_VMSA encrypts and measures.

QEMU 7.2 resets each vCPU (``x86_cpu_reset``; for an AP of an SEV-ES guest, ``sev_es_set_reset_vector`` moves it
to the SEV-ES reset block of OVMF's footer table) and hands the state to KVM; KVM's ``sev_es_sync_vmsa`` copies
it into the vCPU's VMSA page before ``KVM_SEV_LAUNCH_UPDATE_VMSA``. Every byte of that page is in the launch digest,
so a guest owner predicts the measurement only if the VMM puts exactly these values there. The layout is the VMCB
save area of AMD APM Vol. 2, Table B-4 (Linux's ``struct sev_es_save_area``); the values are the reset state as
QEMU sets it and KVM adjusts it (EFER.SVME, CR4.MCE), the ones guest-owner tools (``sev-snp-measure --mode seves
--vmm-type QEMU``) also compute. Fields not listed are zero.
"""

from __future__ import annotations

import struct

from .abi import VMSA_SIZE

BSP_RESET_EIP = 0xFFFFFFF0  #: the architectural reset vector (CS base 0xffff0000, IP 0xfff0)

# offsets in the save area (APM Table B-4)
_SEGMENTS = {"es": 0x00, "cs": 0x10, "ss": 0x20, "ds": 0x30, "fs": 0x40, "gs": 0x50,
             "gdtr": 0x60, "ldtr": 0x70, "idtr": 0x80, "tr": 0x90}
_U64 = {"efer": 0xD0, "cr4": 0x148, "cr0": 0x158, "dr7": 0x160, "dr6": 0x168, "rflags": 0x170, "rip": 0x178,
        "g_pat": 0x268, "rdx": 0x310, "sev_features": 0x3B0, "xcr0": 0x3E8}
_MXCSR, _X87_FCW = 0x408, 0x410

# reset-state segment attributes as the VMCB packs them (QEMU's flags >> 8, G/D/L in bits 8..11)
_DATA, _CODE, _LDT, _TSS = 0x93, 0x9B, 0x82, 0x8B
EFER_SVME = 1 << 12          # KVM sets it in every SVM guest's EFER
CR4_MCE = 1 << 6             # KVM's reset CR4 for an SEV-ES vCPU
CR0_ET = 1 << 4
PAT_RESET = 0x0007040600070406


def reset_vmsa(eip: int, cpuid_signature: int, sev_features: int = 0) -> bytes:
    """The 4 KiB VMSA of a vCPU that starts at ``eip`` (linear: CS base = eip & 0xffff0000, IP = eip & 0xffff),
    with ``cpuid_signature`` (CPUID 1 EAX: family/model/stepping of ``-cpu``) in RDX as after RESET."""
    page = bytearray(VMSA_SIZE)
    segs = {"es": (0, _DATA, 0xFFFF, 0), "cs": (0xF000, _CODE, 0xFFFF, eip & 0xFFFF0000),
            "ss": (0, _DATA, 0xFFFF, 0), "ds": (0, _DATA, 0xFFFF, 0), "fs": (0, _DATA, 0xFFFF, 0),
            "gs": (0, _DATA, 0xFFFF, 0), "gdtr": (0, 0, 0xFFFF, 0), "idtr": (0, 0, 0xFFFF, 0),
            "ldtr": (0, _LDT, 0xFFFF, 0), "tr": (0, _TSS, 0xFFFF, 0)}
    for name, (sel, attrib, limit, base) in segs.items():
        struct.pack_into("<HHIQ", page, _SEGMENTS[name], sel, attrib, limit, base)
    values = {"efer": EFER_SVME, "cr4": CR4_MCE, "cr0": CR0_ET, "dr7": 0x400, "dr6": 0xFFFF0FF0, "rflags": 0x2,
              "rip": eip & 0xFFFF, "g_pat": PAT_RESET, "rdx": cpuid_signature, "sev_features": sev_features,
              "xcr0": 0x1}
    for name, v in values.items():
        struct.pack_into("<Q", page, _U64[name], v)
    struct.pack_into("<I", page, _MXCSR, 0x1F80)
    struct.pack_into("<H", page, _X87_FCW, 0x37F)
    return bytes(page)
