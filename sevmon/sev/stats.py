"""Counters of one VM's kernel, the same on the simulated platform and on real hardware."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class KernelStats:
    """Cumulative counters of one VM's kernel. ``bytes_*`` are what the PSP processed for
    DBG_DECRYPT/DBG_ENCRYPT (firmware lengths, so 16-byte rounding and RMW reads count)."""

    round_trips: int = 0
    firmware_calls: int = 0
    bytes_decrypted: int = 0
    bytes_encrypted: int = 0

    def snapshot(self) -> KernelStats:
        return KernelStats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def __sub__(self, other: KernelStats) -> KernelStats:
        return KernelStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})
