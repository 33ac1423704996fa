"""CPUID Fn8000_001F, the leaf that tells host and guest where the C-bit is.

A debugger needs it because guest CR3 and every page-table entry carry the C-bit
(``1 << cbitpos``) and must be masked before use as an address (sev-api.md §4).
"""

from __future__ import annotations

from dataclasses import dataclass

LEAF = 0x8000001F

# EAX feature bits
SME = 1 << 0
SEV = 1 << 1
VM_PAGE_FLUSH = 1 << 2
SEV_ES = 1 << 3
SEV_SNP = 1 << 4
SME_COHERENT = 1 << 10


@dataclass(frozen=True)
class SevCpuid:
    """The four registers of Fn8000_001F and the fields a VMM or debugger decodes from them."""

    eax: int
    ebx: int
    ecx: int
    edx: int

    @classmethod
    def make(cls, *, cbitpos: int = 47, reduced_phys_bits: int = 1, max_asid: int = 509,
             min_asid: int = 1, features: int = SME | SEV | VM_PAGE_FLUSH) -> SevCpuid:
        """A Rome-like leaf by default: C-bit 47, 1 bit of reduction, 509 ASIDs from 1."""
        if not 0 <= cbitpos < 64 or not 0 <= reduced_phys_bits < 64:
            raise ValueError("cbitpos and reduced_phys_bits are 6-bit fields")
        return cls(features, (reduced_phys_bits << 6) | cbitpos, max_asid, min_asid)

    @property
    def cbitpos(self) -> int:
        """EBX[5:0]: the C-bit position in a physical address / page-table entry."""
        return self.ebx & 0x3F

    @property
    def reduced_phys_bits(self) -> int:
        """EBX[11:6]: physical-address bits lost when memory encryption is on."""
        return (self.ebx >> 6) & 0x3F

    @property
    def me_mask(self) -> int:
        """``1 << cbitpos`` (Linux ``sme_me_mask``/KVM ``sev_me_mask``)."""
        return 1 << self.cbitpos

    @property
    def num_encrypted_guests(self) -> int:
        """ECX: simultaneously encrypted guests = the highest SEV ASID."""
        return self.ecx

    @property
    def min_sev_asid(self) -> int:
        """EDX: first ASID usable by a plain SEV guest (lower ones are SEV-ES/SNP only)."""
        return self.edx

    @property
    def sev(self) -> bool:
        return bool(self.eax & SEV)

    @property
    def sev_es(self) -> bool:
        return bool(self.eax & SEV_ES)
