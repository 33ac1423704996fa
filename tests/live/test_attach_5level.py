"""sevmon attached to a live 5-level-paging guest (``-cpu max``) on q35, RAM in a
``memory-backend-file``: ``info tlb`` equals QEMU's byte for byte; ``info mem`` (which
QEMU 7.2 gets wrong under LA57) equals the walker's own 5-level oracle
(tests/x86/x86_reference.py) run over the same RAM, read from the backend file."""

from __future__ import annotations

import contextlib
import mmap
import sys
from pathlib import Path

import pytest

from sevmon.attach.info_registers_parser import parse_info_registers
from sevmon.attach.layout import ram_ranges
from sevmon.attach.ram import MappedRAM
from tests.live.conftest import Attached, Qemu, hmp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "x86"))
from x86_reference import naive_mem  # noqa: E402


@pytest.fixture(scope="module")
def live(module_tmp):
    qemu = Qemu(module_tmp, mem="3G", cpu="max", machine="q35", backend="file")
    sevmon = Attached(module_tmp, qemu.a, hmp=False)
    assert sevmon.proc.poll() is None, sevmon.output()
    theirs, ours = qemu.qmp("b"), sevmon.qmp()
    yield qemu, theirs, ours
    for q in (theirs, ours):
        with contextlib.suppress(Exception):
            q.close()
    sevmon.stop()
    qemu.stop()


def test_5level_info_tlb_equals_qemus_and_info_mem_the_oracle(live):
    qemu, theirs, ours = live
    theirs.cmd("stop")
    cpu = parse_info_registers(hmp(theirs, "info registers"))
    assert cpu.paging_mode() == "5level"
    tlb = hmp(theirs, "info tlb")
    assert tlb.count("\r\n") > 1000
    assert hmp(ours, "info tlb") == tlb
    # q35 with 3 GiB: 2 GiB below the PCI hole, the rest at 4 GiB (read from QEMU's flat view)
    ranges = ram_ranges(hmp(theirs, "info mtree -f"), {"ram0"})
    assert (ranges[0].gpa, ranges[-1].gpa, ranges[-1].offset) == (0, 1 << 32, 0x80000000)
    with open(qemu.mem_path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 3 << 30, mmap.MAP_SHARED, mmap.PROT_READ)
    ram = MappedRAM(ranges, {"ram0": mm}, 3 << 30)
    try:
        want = "".join(line + "\r\n" for line in naive_mem(ram, cpu))
    finally:
        mm.close()
    assert want.count("\r\n") > 20
    assert hmp(ours, "info mem") == want
    lines = [ln for ln in tlb.split("\r\n") if ln]
    for ln in (lines[0], lines[len(lines) // 2]):
        va = ln.split(": ")[0]
        for cmd in (f"gva2gpa 0x{va}", f"x /4xg 0x{va}"):
            assert hmp(ours, cmd) == hmp(theirs, cmd), cmd
