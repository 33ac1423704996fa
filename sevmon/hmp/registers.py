"""``$reg`` names for HMP expressions: QEMU's x86 ``monitor_defs`` plus a few of sevmon's.

QEMU (target/i386/monitor.c) knows eax ecx edx ebx esp|sp ebp|fp esi edi r8..r15 eflags
eip, the segments (cs, cs.base, cs.limit, ...) and pc (= cs.base + eip); on x86_64 the
e-names read the whole 64-bit register. sevmon also accepts the 64-bit names (rax..,
rip, rflags) and the control registers (cr0, cr2, cr3, cr4, efer) because walking a
guest's tables by hand starts from ``$cr3``.
"""

from __future__ import annotations

from sevmon.hmp.errors import HmpError

_QEMU = {
    "eax": "rax", "ecx": "rcx", "edx": "rdx", "ebx": "rbx", "esp": "rsp", "sp": "rsp", "ebp": "rbp",
    "fp": "rbp", "esi": "rsi", "edi": "rdi", "eflags": "rflags", "eip": "rip",
    **{f"r{i}": f"r{i}" for i in range(8, 16)},
}
_SEVMON = {n: n for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "rip", "rflags",
                          "cr0", "cr2", "cr3", "cr4", "efer")}
_SEGMENTS = ("cs", "ds", "es", "ss", "fs", "gs")

REGISTER_NAMES = sorted({*_QEMU, *_SEVMON, "pc", *_SEGMENTS,
                         *(f"{s}.base" for s in _SEGMENTS), *(f"{s}.limit" for s in _SEGMENTS)})


def get_register(cpu, name: str) -> int:
    """The value of ``$name`` on ``cpu``; HmpError("unknown register") otherwise."""
    if name in _QEMU:
        return cpu.get(_QEMU[name])
    if name in _SEVMON:
        return cpu.get(name)
    if name == "pc":
        return (cpu.get("cs_base") + cpu.get("rip")) & (1 << 64) - 1
    if name in _SEGMENTS:
        return cpu.get(name) & 0xFFFFFFFF
    seg, _, part = name.partition(".")
    if seg in _SEGMENTS and part in ("base", "limit"):
        v = cpu.get(f"{seg}_{part}")
        return v & 0xFFFFFFFF if part == "limit" else v
    raise HmpError("unknown register")
