"""Attach maps QEMU's RAM backends only as QEMU's flat view and QEMU's own reading allow: a flat-view range beyond
its backend's size, or a backend whose bytes are not what QEMU reads there (two of equal size swapped), is one
sentence, never a short or wrong mapping."""

from __future__ import annotations

import asyncio

import pytest

from sevmon.attach.errors import AttachError
from sevmon.attach.layout import RamRange
from sevmon.attach.ram import open_backends
from sevmon.attach.verify import verify_backends

MIB = 1 << 20


def _file(path, seed: int):
    data = bytes((i * seed + seed) & 0xFF for i in range(MIB))
    path.write_bytes(data)
    return data


class QemuReads:
    """A stand-in for QEMU's monitor: ``xp /8xg`` answers from what QEMU really maps at each guest address."""

    def __init__(self, ram: dict[int, bytes]):
        self.ram = ram

    async def hmp(self, line: str, cpu_index=None) -> str:
        gpa = int(line.split()[-1], 16)
        base = max(b for b in self.ram if b <= gpa)
        data = self.ram[base][gpa - base:gpa - base + 64]
        words = [f"0x{int.from_bytes(data[i:i + 8], 'little'):016x}" for i in range(0, 64, 8)]
        return "".join(f"{gpa + i * 8:016x}: {words[i]} {words[i + 1]}\r\n" for i in range(0, 8, 2))


def _backends(tmp_path):
    a, b = _file(tmp_path / "a", 3), _file(tmp_path / "b", 5)
    memdevs = [{"id": "m0", "size": MIB, "share": True}, {"id": "m1", "size": MIB, "share": True}]
    types = {"m0": "memory-backend-file", "m1": "memory-backend-file"}
    ranges = [RamRange(0, MIB, "m0", 0), RamRange(MIB, MIB, "m1", 0)]
    return a, b, memdevs, types, ranges


def test_backends_that_hold_what_qemu_reads_are_accepted(tmp_path):
    a, b, memdevs, types, ranges = _backends(tmp_path)
    ram = open_backends(memdevs, types, {"m0": str(tmp_path / "a"), "m1": str(tmp_path / "b")}, None, ranges)
    try:
        asyncio.run(verify_backends(QemuReads({0: a, MIB: b}), ram))
        assert ram.read(MIB - 8, 16) == a[-8:] + b[:8]
    finally:
        ram.close()


def test_two_equal_size_backends_swapped_are_refused(tmp_path):
    a, b, memdevs, types, ranges = _backends(tmp_path)
    ram = open_backends(memdevs, types, {"m0": str(tmp_path / "b"), "m1": str(tmp_path / "a")}, None, ranges)
    try:
        with pytest.raises(AttachError) as ei:
            asyncio.run(verify_backends(QemuReads({0: a, MIB: b}), ram))
    finally:
        ram.close()
    assert str(ei.value) == ("QEMU's RAM backend 'm0' as sevmon mapped it does not hold what QEMU reads at "
                             "guest-physical 0x0: sevmon would read and write the wrong memory")


def test_a_flat_view_range_beyond_its_backend_is_refused(tmp_path):
    _file(tmp_path / "a", 3)
    with pytest.raises(AttachError) as ei:
        open_backends([{"id": "m0", "size": MIB, "share": True}], {"m0": "memory-backend-file"},
                      {"m0": str(tmp_path / "a")}, None, [RamRange(0x100000000, MIB, "m0", MIB // 2)])
    assert str(ei.value) == ("QEMU's flat view puts 0x100000 bytes of backend 'm0' at offset 0x80000, beyond its "
                             "size 0x100000")
