"""What guest to build: a typed specification, independent of how it was asked for.

The command line turns its options into a :class:`GuestSpec` (``sevmon.cli.guest_spec``); tests, the bench and
``sevmon.testing`` build one directly. :func:`sevmon.machine.builder.build_machine` is the one factory over it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class SevSpec:
    """The SEV guest options (QEMU's ``sev-guest`` object) and which kernel runs them."""

    policy: int = 0x0                 #: guest policy; bit 0 (NODBG) forbids debug access, bit 2 (ES) SEV-ES
    cbitpos: int = 47                 #: CPUID 0x8000001F EBX[5:0]
    reduced_phys_bits: int = 1        #: CPUID 0x8000001F EBX[11:6]
    kvm: bool = False                 #: the real /dev/kvm + /dev/sev instead of the platform model
    dh_cert_file: str | None = None   #: the guest owner's DH certificate (base64), QEMU's dh-cert-file
    session_file: str | None = None   #: the guest owner's launch session (base64), QEMU's session-file
    platform_file: str | None = None  #: the simulated platform's persistent keys (--sev-platform)


@dataclass(frozen=True)
class GuestSpec:
    """One guest: where its memory and registers come from, and how the monitor may reach them."""

    source: Literal["builtin", "core", "raw"] = "builtin"
    image: str | None = None          #: the core or raw image (source core/raw)
    cpu_state: str | None = None      #: cpu.json: registers (needed for raw, fills gaps for core)
    sev: SevSpec | None = field(default_factory=SevSpec)  #: None: plain, unencrypted memory
    bios: str | None = None           #: firmware measured at launch (built-in guest)
    pflash: tuple[str, ...] = ()      #: pflash units 0, 1...: unit 0 replaces the BIOS and alone is measured
    paging: str = "4level"            #: built-in guest paging mode, a :data:`sevmon.x86.modes.MODES` name
    memory_mib: int = 256             #: built-in guest RAM
    smp: int = 1                      #: QEMU's -smp: vCPUs (an SEV-ES guest launches one VMSA each)
    cpu_model: str = "qemu64"         #: QEMU's -cpu: the CPUID signature in an SEV-ES guest's VMSAs
    debug_policy: bool = True         #: the security-policy object: may debug access happen at all
    debug_cache_mb: int = 64          #: debug page cache size
    prelaunch: bool = False           #: QEMU's -S: the SEV launch finishes on the first cont
    workload: bool = True             #: built-in guest: map/unmap pages while running
    incoming: str | None = None       #: QEMU's -incoming (unix:PATH, exec:CMD): receive the guest by migration
