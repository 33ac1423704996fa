"""A real Linux guest's RAM, opened with no CPU state as an SEV guest: sevmon finds the kernel's VMCOREINFO through
DBG_DECRYPT and walks the kernel's own page tables from ``init_top_pgt``.

One QEMU 7.2 boot per paging mode (TCG, 1 GiB): pause, take QEMU's own ``info tlb``/``info mem``/``x``/``gva2gpa``
(walked from the live CR3), ``pmemsave`` the RAM, quit QEMU; then ``sevmon serve --raw RAM --sev --policy 0x4``, an SEV-ES guest (no
``--cpu-state``): the kernel half of each answer must equal QEMU's, and ``query-guest-kernel``'s release must be the
guest kernel's ``uname -r`` (read from the bzImage's own version string, not from sevmon). Real gdb on the same image
reads what QEMU reads there, every register ``<unavailable>``. QEMU 7.2's 5-level
``info mem`` prints nothing (its checks are inverted), so there the reference is the walker oracle
(tests/x86/x86_reference.py) run over the same RAM with QEMU's registers.
"""

from __future__ import annotations

import contextlib
import re
import sys
from pathlib import Path

import pytest

from sevmon.attach.info_registers_parser import parse_info_registers
from sevmon.machine.images import load_raw
from sevmon.testing import SevmonDaemon
from tests.gdb.gdb_support import gdb_x_words, run_gdb
from tests.live.conftest import Qemu, hmp, require_guest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "x86"))
from x86_reference import naive_mem  # noqa: E402

RAM_SIZE = 1 << 30
CPUS = {"4level": "max,la57=off", "5level": "max"}


def kernel_release(bzimage: Path) -> str:
    """``uname -r`` of a bzImage: the setup header's ``kernel_version`` pointer (offset 0x20e) names a string
    at 0x200 + that value, ``"6.1.0-... (builder) #1 SMP ..."`` (what ``file`` prints)."""
    data = bzimage.read_bytes()
    assert data[0x202:0x206] == b"HdrS", "not a bzImage"
    at = 0x200 + int.from_bytes(data[0x20E:0x210], "little")
    return data[at:data.index(b"\0", at)].decode().split()[0]


def kernel_half(text: str) -> str:
    """The lines of ``info mem``/``info tlb`` whose (first) address is in the upper half: the kernel's."""
    return "".join(ln + "\r\n" for ln in text.split("\r\n") if ln and int(ln.split("-")[0].split(":")[0], 16) >> 63)


@pytest.fixture(scope="module", params=["4level", "5level"])
def guest(request, module_tmp):
    """(mode, QEMU's answers, path of the RAM image) for one booted, paused guest."""
    mode = request.param
    tmp = module_tmp / mode
    tmp.mkdir()
    qemu = Qemu(tmp, mem="1G", cpu=CPUS[mode], backend=None)
    try:
        q = qemu.qmp("b")
        q.cmd("stop")
        cpu = parse_info_registers(hmp(q, "info registers"))
        assert cpu.paging_mode() == mode
        theirs = {"tlb": hmp(q, "info tlb")}
        if mode != "5level":  # QEMU 7.2's LA57 info mem prints nothing, after some 40 s of walking: not asked
            theirs["mem"] = hmp(q, "info mem")
        # probes in RAM (the image holds RAM only: the local APIC's page is not in it)
        lines = [ln for ln in kernel_half(theirs["tlb"]).split("\r\n") if ln and int(ln.split()[1], 16) < RAM_SIZE]
        probes = [ln.split(": ")[0] for ln in (lines[0], lines[len(lines) // 3], lines[len(lines) // 2], lines[-1])]
        for va in probes:
            for cmd in (f"x /4xg 0x{va}", f"gva2gpa 0x{va}"):
                theirs[cmd] = hmp(q, cmd)
        ram = tmp / "ram.bin"
        q.cmd("pmemsave", val=0, size=RAM_SIZE, filename=str(ram))
        with contextlib.suppress(Exception):
            q.close()
    finally:
        qemu.stop()
    if mode == "5level":  # QEMU 7.2's LA57 info mem is empty: the oracle over the same RAM and registers
        theirs["mem"] = "".join(ln + "\r\n" for ln in naive_mem(load_raw(ram).ram, cpu))
    yield mode, theirs, ram


@pytest.fixture(scope="module")
def opened(guest):
    """(mode, QEMU's answers, the daemon, query-guest-kernel, the debug stats right after it) for the guest's RAM
    opened in sevmon as an SEV-ES guest with no CPU state, gdb stub on: one (slow) start per paging mode, and what
    finding the kernel cost read before any test reads memory."""
    mode, theirs, ram = guest
    with SevmonDaemon("--raw", str(ram), "--sev", "--policy", "0x4", "--gdb", "unix:gdb.sock",
                      start_timeout=600) as d:
        info = d.qmp.cmd("query-guest-kernel")
        yield mode, theirs, d, info, d.qmp.cmd("query-sev-debug-stats")


def test_kernel_half_equals_qemus_walked_from_the_vmcoreinfo_root(opened):
    mode, theirs, d, info, stats = opened
    kernel, _ = require_guest()
    q = d.qmp
    assert info["release"] == kernel_release(kernel)
    assert info["paging-levels"] == (5 if mode == "5level" else 4)
    assert info["vmcoreinfo"].startswith(f"OSRELEASE={info['release']}\n")
    assert info["scanned-pages"] <= RAM_SIZE >> 12
    assert stats["firmware-calls"] <= info["scanned-pages"] + 16  # at most one per page looked at
    assert "registers not available" in q.hmp("info registers")

    tlb = q.hmp("info tlb")
    want_tlb = kernel_half(theirs["tlb"])
    assert want_tlb.count("\r\n") > 1000
    assert tlb == want_tlb  # init_top_pgt maps the kernel half only
    want_mem = kernel_half(theirs["mem"])
    assert want_mem.count("\r\n") > 10
    assert q.hmp("info mem") == want_mem
    for cmd, want in theirs.items():
        if cmd.startswith(("x ", "gva2gpa ")):
            assert q.hmp(cmd) == want, cmd
    # every byte came through DBG_DECRYPT
    assert q.cmd("query-sev-debug-stats")["round-trips"] > stats["round-trips"]
    # a user address needs a process's CR3, which a guest without CPU state cannot give
    assert "is a user address" in q.hmp("gva2gpa 0x400000")
    assert "is a user address" in q.hmp("x /4xg 0x400000")


def test_gdb_reads_the_kernel_half_as_qemu_does_with_every_register_unavailable(opened):
    """Real gdb on the same image (an SEV-ES guest, no CPU state): ``target remote`` succeeds, every register is
    ``<unavailable>``, ``x/4gx`` on QEMU's probes equals QEMU's ``x`` walked from the live CR3, ``x/s`` on the
    kernel's own ``init_uts_ns`` (its VA from VMCOREINFO) prints ``Linux`` and the bzImage's release, and a user
    address is gdb's ``Cannot access memory``."""
    mode, theirs, d, info, _ = opened
    kernel, _ = require_guest()
    uts = int(re.search(r"^SYMBOL\(init_uts_ns\)=([0-9a-f]+)$", info["vmcoreinfo"], re.M).group(1), 16)
    probes = {int(cmd.split()[2], 16): want for cmd, want in theirs.items() if cmd.startswith("x ")}
    out = run_gdb(f"{d.dir}/gdb.sock", "p $rip", "info registers rsp", *[f"x/4gx {a:#x}" for a in probes],
                  f"x/s {uts:#x}", f"x/s {uts + 2 * 65:#x}", "x/2gx 0x400000", timeout=300)
    assert "PC register is not available" not in out and "$1 = <unavailable>" in out, out
    assert re.search(r"^rsp +<unavailable>$", out, re.M)
    for addr, want in probes.items():
        words = [int(w, 16) for ln in want.split("\r\n") for w in ln.partition(":")[2].split()]
        assert gdb_x_words(out, addr) == words and len(words) == 4, (hex(addr), out)
    assert f'{uts:#x}:\t"Linux"' in out                                     # new_utsname.sysname
    assert f'{uts + 130:#x}:\t"{kernel_release(kernel)}"' in out            # .release, two fields on
    assert "Cannot access memory at address 0x400000" in out
