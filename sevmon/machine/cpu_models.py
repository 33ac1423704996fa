"""QEMU 7.2's x86 CPU models, as far as a launch needs them: ``-cpu MODEL`` names the CPUID signature (CPUID 1
EAX: family, model, stepping) that QEMU puts in RDX at reset, and so in every SEV-ES vCPU's measured VMSA.

The names are QEMU 7.2's ``-cpu help`` for the models an SEV guest runs on (the default ``qemu64`` and the EPYC
family); the signatures are the EDX that QEMU 7.2's ``info registers`` shows at reset for each.
"""

from __future__ import annotations

DEFAULT = "qemu64"

_QEMU64 = 0x00060FB1       # family 15, model 107, stepping 1
_EPYC = 0x00800F12         # family 23, model 1, stepping 2
_EPYC_ROME = 0x00830F10    # family 23, model 49, stepping 0
_EPYC_MILAN = 0x00A00F11   # family 25, model 1, stepping 1

SIGNATURES = {
    "qemu64": _QEMU64, "qemu64-v1": _QEMU64,
    "EPYC": _EPYC, "EPYC-v1": _EPYC, "EPYC-v2": _EPYC, "EPYC-v3": _EPYC, "EPYC-IBPB": _EPYC,
    "EPYC-Rome": _EPYC_ROME, "EPYC-Rome-v1": _EPYC_ROME, "EPYC-Rome-v2": _EPYC_ROME,
    "EPYC-Milan": _EPYC_MILAN, "EPYC-Milan-v1": _EPYC_MILAN,
}


class CpuModelError(ValueError):
    """An unknown ``-cpu`` model: QEMU's sentence."""


def cpuid_signature(model: str) -> int:
    """CPUID 1 EAX of ``model``; CpuModelError in QEMU's words for a model QEMU 7.2 does not have."""
    try:
        return SIGNATURES[model]
    except KeyError:
        raise CpuModelError(f"unable to find CPU model '{model}'") from None
