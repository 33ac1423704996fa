"""System flash as QEMU's ``-drive if=pflash,unit=N`` maps it (hw/i386/pc_sysfw.c).

Units are stacked downwards from 4 GiB: unit 0 (OVMF's code, which holds the reset
vector at its very end) ends at 4 GiB, unit 1 (the variable store) right below it, and
so on (``pc_system_flash_map``). Under SEV, unit 0 alone is encrypted in place and
measured, with one LAUNCH_UPDATE_DATA over the whole unit (``sev_encrypt_flash``); the
other units stay plain and unmeasured. When unit 0 exists the BIOS ROM (``-bios``) is
not loaded at all, so nothing else is measured. QEMU also copies the last 128 KiB of unit
0 to the ISA BIOS window below 1 MiB (plain RAM, not measured); sevmon does the same.
"""

from __future__ import annotations

from dataclasses import dataclass

FLASH_SECTOR_SIZE = 4096
MAX_FW_SIZE = 8 << 20   # PCMachineState.max_fw_size default ("max-fw-size")
FOUR_GIB = 1 << 32
ISA_BIOS_MAX = 128 << 10


class FlashError(Exception):
    """A flash image QEMU would refuse: QEMU's own words, one line."""


@dataclass(frozen=True)
class FlashUnit:
    unit: int
    path: str
    data: bytes
    gpa: int  # where the unit is mapped (its last byte is at gpa + len - 1)

    @property
    def end(self) -> int:
        return self.gpa + len(self.data)


def map_flash(paths: list[str]) -> list[FlashUnit]:
    """Read and place each ``--pflash`` file as unit 0, 1, ... (QEMU's size checks and texts)."""
    units, total = [], 0
    for i, path in enumerate(paths):
        with open(path, "rb") as f:
            data = f.read()
        size = len(data)
        if size == 0 or size % FLASH_SECTOR_SIZE:
            raise FlashError(f"system firmware block device pflash{i} has invalid size {size} "
                             f"(its size must be a non-zero multiple of {FLASH_SECTOR_SIZE:#x})")
        if total + size > MAX_FW_SIZE:
            raise FlashError(f"combined size of system firmware exceeds {MAX_FW_SIZE} bytes")
        total += size
        units.append(FlashUnit(i, path, data, FOUR_GIB - total))
    return units


def isa_bios_copy(unit0: FlashUnit) -> tuple[int, bytes]:
    """``pc_isa_bios_init``: (gpa, bytes) of the copy of unit 0's top below 1 MiB."""
    n = min(len(unit0.data), ISA_BIOS_MAX)
    return 0x100000 - n, unit0.data[-n:]
