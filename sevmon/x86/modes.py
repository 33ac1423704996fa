"""The x86 paging modes, described once: every consumer reads its layout from here.

The walkers (``info tlb``/``info mem``/``gva2gpa``), the guests that build tables (the built-in guest, the scale
generator) and the C-bit converter all need the same facts about a mode: how many levels, how many entries and how
much virtual address space per entry, where a PS bit makes a large leaf, how wide an entry is (only 8-byte entries
carry a C-bit), and which control-register bits put a vCPU in that mode.

Names are :meth:`CpuState.paging_mode`'s: ``"32"``, ``"pae"``, ``"4level"``, ``"5level"``. ``"32pse"`` is ``"32"``
with CR4.PSE, where a PDE with PS maps 4 MiB. The command line's short names (``4``, ``5``, ``pae``, ``32``) map
through :data:`CLI_NAMES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sevmon.x86.cpu import CR0_PE, CR0_PG, CR4_LA57, CR4_PSE, EFER_LMA, EFER_LME, EFER_NXE

#: Address bits 12..49: what QEMU's ``info tlb`` / ``info mem`` use for CR3 and table pointers.
MONITOR_TABLE_MASK = 0x3FFFFFFFFF000


@dataclass(frozen=True, slots=True)
class Level:
    """One level of the tables, root first."""

    shift: int       #: log2 of the VA span of one entry
    entries: int     #: entries per table at this level (the PAE root has 4)
    leaf_mask: int   #: info tlb's physical-address column mask for a leaf here; 0: PS does not make a leaf
    ands_prot: bool  #: a table entry here ANDs its U/W/P into the leaves below (PAE PDPTEs have none)

    @property
    def large_leaf(self) -> bool:
        """PS in an entry at this level maps a large page (never at the 4 KiB level, which has no PS)."""
        return self.leaf_mask != 0 and self.shift > 12


@dataclass(frozen=True, slots=True)
class PagingMode:
    name: str
    entry_size: int            #: 4 (32-bit legacy) or 8; only 8-byte entries carry the C-bit
    levels: tuple[Level, ...]  #: root first; the last level holds 4 KiB leaves only
    canon_bit: int             #: VA sign-extension bit (0: none)
    cr4: int                   #: CR4 of a Linux guest in this mode
    efer: int                  #: EFER of a Linux guest in this mode

    cr0 = CR0_PG | CR0_PE | 0x50032  # PG, WP, AM, NE, ET, MP, PE: what Linux runs with (0x80050033)

    @property
    def wide(self) -> bool:
        return self.entry_size == 8

    @property
    def long_mode(self) -> bool:
        return bool(self.efer & EFER_LMA)

    @property
    def table_mask(self) -> int:
        """The bits the monitor walkers take as a table pointer (QEMU's masks)."""
        return MONITOR_TABLE_MASK if self.wide else 0xFFFFF000


_LINUX_CR4 = 0x3406E0  # SMAP, SMEP, OSXSAVE, OSXMMEXCPT, OSFXSR, PGE, MCE, PAE
_4K_32 = Level(12, 1024, 0xFFFFF000, True)
_LONG = (Level(39, 512, 0, True), Level(30, 512, 0x3FFFFC0000000, True),
         Level(21, 512, 0x3FFFFFFE00000, True), Level(12, 512, 0x3FFFFFFFFF000, True))
_LONG_EFER = EFER_NXE | EFER_LMA | EFER_LME | 1  # SCE

MODES: dict[str, PagingMode] = {
    # tlb_info_32: 4M PA = pde & ~((1 << 21) - 1) on a 32-bit pde (bit 21 kept, PSE-36 bits dropped)
    "32": PagingMode("32", 4, (Level(22, 1024, 0, True), _4K_32), 0, 0x340690 & ~CR4_PSE, 0),
    "32pse": PagingMode("32pse", 4, (Level(22, 1024, 0xFFE00000, True), _4K_32), 0, 0x340690, 0),
    # tlb_info_pae32 keeps bits 52..63 (NX) in the PA column of 2M and 4K lines; we print the address bits only
    "pae": PagingMode("pae", 8, (Level(30, 4, 0, False), Level(21, 512, 0x000FFFFFFFE00000, True),
                                 Level(12, 512, 0x000FFFFFFFFFF000, True)), 0, 0x3406F0, EFER_NXE),
    "4level": PagingMode("4level", 8, _LONG, 47, _LINUX_CR4, _LONG_EFER),
    "5level": PagingMode("5level", 8, (Level(48, 512, 0, True), *_LONG), 56, _LINUX_CR4 | CR4_LA57, _LONG_EFER),
}

#: The command line's ``--paging`` names (the built-in 32-bit guest uses PSE, as Linux does).
CLI_NAMES = {"4": "4level", "5": "5level", "pae": "pae", "32": "32pse"}


def mode_of(cpu) -> PagingMode | None:
    """The mode ``cpu`` (a :class:`~sevmon.x86.cpu.CpuState`) translates with, or None with paging off."""
    name = cpu.paging_mode()
    if name == "off":
        return None
    if name == "32" and cpu.cr4 & CR4_PSE:
        name = "32pse"
    return MODES[name]
