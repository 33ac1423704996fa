"""vCPU register state, as the monitor sees it (what ``info registers`` and the walkers read).

Registers are plain ints keyed by QEMU's lower-case names (``rax``.. ``r15``, ``rip``,
``rflags``, ``cr0``..``cr4``, ``efer``, segment selectors/bases, ``gdt_base``...). 32-bit
guests use the same keys (``eax`` is an alias of ``rax``; ``eip`` of ``rip``; ``efl``/``rfl``
of ``rflags``). Loaded from QEMU's ELF notes or from a ``cpu.json`` of hex strings.

A vCPU whose registers cannot be known (an SEV-ES guest: its state is encrypted in its VMSA, and neither KVM nor
QEMU can read it) is a :class:`CpuState` with ``unavailable`` set to the one sentence that says why. Its ``regs``
stay empty and every read through :meth:`CpuState.get` (so every CR3-based walk, ``$reg`` expression and register
dump) raises :class:`RegistersUnavailable` with that sentence: no code path can print a stale or made-up value. A
walk of such a guest must start from another root (``root=`` in :mod:`sevmon.x86.translation`, with the paging
registers of the kernel whose tables it walks), never from this CpuState's CR3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from sevmon.errors import CommandError

CR0_PG = 1 << 31
CR0_PE = 1 << 0
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

GPRS64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

_ALIASES = {
    "eax": "rax", "ebx": "rbx", "ecx": "rcx", "edx": "rdx", "esi": "rsi", "edi": "rdi",
    "ebp": "rbp", "esp": "rsp", "eip": "rip", "efl": "rflags", "rfl": "rflags", "eflags": "rflags",
}


_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr")
#: Every register name sevmon reads from a ``CpuState`` (``info registers``, dumps, the gdb stub, ``$reg``), in
#: canonical form: a ``cpu.json`` key outside these (and their aliases) would be silently unused.
KNOWN_REGISTERS = frozenset(
    [*GPRS64, "rip", "rflags", "cr0", "cr2", "cr3", "cr4", "cr8", "efer", "xcr0", "cpl", "kernel_gs_base",
     "fcw", "fsw", "fpstt", "ftw", "mxcsr", "fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
    + [f"{s}{suffix}" for s in _SEGMENTS for suffix in ("", "_base", "_limit", "_flags")]
    + [f"{t}_{f}" for t in ("gdt", "idt") for f in ("base", "limit")]
    + [f"dr{i}" for i in range(8)] + [f"fpr{i}" for i in range(8)] + [f"xmm{i}" for i in range(32)]
    + [f"opmask{i}" for i in range(8)])


#: Why an SEV-ES guest's registers are not shown: the one sentence every front end reports.
VMSA_ENCRYPTED = ("the vCPU register state of this SEV-ES guest is encrypted in its VMSA: neither KVM nor QEMU can "
                  "read it, so sevmon knows no register values (nor the page tables CR3 would point to)")


#: The same, attached to a live QEMU: QEMU skips the register sync of such a guest, so its own dump is stale.
QEMU_DUMP_STALE = (VMSA_ENCRYPTED + "; QEMU's own 'info registers' shows its cached reset state instead, and "
                   "sevmon never uses it")


class RegistersUnavailable(CommandError):
    """A register was asked of a vCPU whose registers are unknown (:attr:`CpuState.unavailable`): a monitor
    error (QMP GenericError, HMP ``Error: ...``) with the sentence that says why."""


def canonical_reg(name: str) -> str:
    n = name.lower()
    return _ALIASES.get(n, n)


@dataclass
class CpuState:
    """One vCPU. ``regs`` maps canonical names to ints; missing registers read as 0. ``unavailable``: why this
    vCPU's registers are unknown (None: they are known), see the module docstring."""

    index: int = 0
    regs: dict[str, int] = field(default_factory=dict)
    halted: bool = True
    #: why these registers cannot be used (SEV-ES: encrypted in the VMSA; a raw image without --cpu-state), or None
    unavailable: str | None = None

    @classmethod
    def encrypted(cls, index: int = 0) -> CpuState:
        """An SEV-ES vCPU: its registers live in its encrypted VMSA."""
        return cls(index=index, unavailable=VMSA_ENCRYPTED)

    @property
    def registers_known(self) -> bool:
        """False when no register value may be shown or used (an SEV-ES guest's vCPU)."""
        return self.unavailable is None

    def get(self, name: str) -> int:
        if self.unavailable is not None:
            raise RegistersUnavailable(self.unavailable)
        return self.regs.get(canonical_reg(name), 0)

    def set(self, name: str, value: int) -> None:
        if self.unavailable is not None:
            raise RegistersUnavailable(self.unavailable)
        self.regs[canonical_reg(name)] = value

    def update(self, values: dict[str, int]) -> None:
        for k, v in values.items():
            self.set(k, v)

    # -- paging mode ---------------------------------------------------------------------
    @property
    def cr0(self) -> int:
        return self.get("cr0")

    @property
    def cr3(self) -> int:
        return self.get("cr3")

    @property
    def cr4(self) -> int:
        return self.get("cr4")

    @property
    def efer(self) -> int:
        return self.get("efer")

    @property
    def long_mode(self) -> bool:
        """EFER.LMA (QEMU's HF_LMA): the vCPU runs 64-bit paging when PG and PAE are on."""
        return bool(self.efer & EFER_LMA)

    def paging_mode(self) -> str:
        """``"off"``, ``"32"``, ``"pae"``, ``"4level"`` or ``"5level"`` (QEMU's dispatch order)."""
        if not self.cr0 & CR0_PG:
            return "off"
        if self.cr4 & CR4_PAE:
            if self.long_mode:
                return "5level" if self.cr4 & CR4_LA57 else "4level"
            return "pae"
        return "32"

    # -- persistence ---------------------------------------------------------------------
    @classmethod
    def from_json_text(cls, text: str, index: int = 0) -> CpuState:
        """Parse the ``cpu.json`` format: ``{"cr3": "0x29da000", ...}`` (hex strings or ints)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("cpu state must be a JSON object of register: value")
        cpu = cls(index=index)
        for k, v in data.items():
            if isinstance(v, str):
                v = int(v, 0)
            if not isinstance(v, int):
                raise ValueError(f"register {k!r}: expected a hex string or integer")
            cpu.set(k, v)
        return cpu

    @classmethod
    def from_json_file(cls, path: str, index: int = 0) -> CpuState:
        with open(path) as f:
            return cls.from_json_text(f.read(), index)
