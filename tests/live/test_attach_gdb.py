"""sevmon attached to a live QEMU 7.2 guest, as a gdb target: the real gdb reads the paused guest through
sevmon's stub (memory by the debug path, registers from QEMU) and sees what QEMU's own monitor shows; Ctrl-C and
continue stop and resume QEMU's guest. The C-bit map answers on the live guest too. One boot per module."""

from __future__ import annotations

import contextlib

import pytest

from tests.gdb.gdb_support import RspClient, gdb_values, gdb_x_words, run_gdb
from tests.live.conftest import Attached, Qemu, hmp


@pytest.fixture(scope="module")
def live(module_tmp):
    qemu = Qemu(module_tmp, mem="1G")
    gdb_path = str(module_tmp / "gdb.sock")
    sevmon = Attached(module_tmp, qemu.a, extra=["--gdb", f"unix:{gdb_path}"])
    assert sevmon.proc.poll() is None, sevmon.output()
    theirs, ours = qemu.qmp("b"), sevmon.qmp()
    yield qemu, sevmon, theirs, ours, gdb_path
    for q in (theirs, ours):
        with contextlib.suppress(Exception):
            q.close()
    sevmon.stop()
    qemu.stop()


def _qemu_words(text: str) -> list[int]:
    """QEMU's ``x /4xg`` text as integers."""
    return [int(w, 16) for line in text.split("\r\n") if line for w in line.split(": ")[1].split()]


def test_gdb_reads_what_qemu_shows(live):
    qemu, sevmon, theirs, ours, gdb_path = live
    theirs.cmd("stop")
    regs = hmp(theirs, "info registers")
    rip = int(regs.split("RIP=")[1].split()[0], 16)
    tlb = [ln for ln in hmp(theirs, "info tlb").split("\r\n") if ln]
    va = int(tlb[len(tlb) // 2].split(":")[0], 16)
    gpa = int(tlb[len(tlb) // 2].split(": ")[1].split()[0], 16)
    out = run_gdb(f"{gdb_path}", "print/x $pc", f"x/4gx {va:#x}", "maintenance packet Qqemu.PhyMemMode:1",
                  f"x/4gx {gpa:#x}", "monitor info mem")
    assert int(gdb_values(out)["$1"], 16) == rip, out
    assert gdb_x_words(out, va) == _qemu_words(hmp(theirs, f"x /4xg {va:#x}")), out
    assert gdb_x_words(out, gpa) == _qemu_words(hmp(theirs, f"xp /4xg {gpa:#x}")), out
    info_mem = hmp(theirs, "info mem").replace("\r\n", "\n")
    assert info_mem.splitlines()[0] in out and info_mem.splitlines()[-1] in out


def test_ctrl_c_and_continue_drive_qemus_guest(live):
    qemu, sevmon, theirs, ours, gdb_path = live
    theirs.cmd("stop")
    rsp = RspClient(gdb_path)
    try:
        assert rsp.ask("?").startswith("T")
        rsp.send("c")
        assert _wait_status(theirs, "running")    # continue reached QEMU
        rsp.send_raw(b"\x03")                     # Ctrl-C
        assert rsp.recv().startswith("T")         # the stop is reported
        assert _wait_status(theirs, "paused")
        rsp.send("vCont;c")
        assert _wait_status(theirs, "running")
        theirs.cmd("stop")                        # whoever stops the guest, gdb hears it
        assert rsp.recv().startswith("T")
        assert rsp.ask("Z0,ffffffff81000000,1") == ""  # breakpoints: unsupported on a live QEMU
        assert rsp.ask("P10=0000000000000000").startswith("E")  # QEMU's registers cannot be written
        rsp.send("D")
        assert rsp.recv() == "OK"
    finally:
        rsp.close()


def test_gdb_stepi_on_a_live_qemu_gives_the_attached_reason(live):
    qemu, sevmon, theirs, ours, gdb_path = live
    theirs.cmd("stop")
    rip = int(hmp(theirs, "info registers").split("RIP=")[1].split()[0], 16)
    out = run_gdb(gdb_path, "stepi", "p/x $pc")
    assert ("sevmon: single-step is not supported: QEMU runs this guest, and QEMU's monitor has no command to "
            "single-step it (use QEMU's own -gdb for stepping)") in out, out
    assert "executes no instructions" not in out
    assert int(gdb_values(out)["$1"], 16) == rip, out  # nothing moved
    assert hmp(theirs, "info status") == "VM status: paused\r\n"


def test_the_c_bit_map_on_a_live_plain_guest(live):
    qemu, sevmon, theirs, ours, gdb_path = live
    assert hmp(ours, "info sev-mem") == "Error: the guest is not an SEV guest: no page has a C-bit\r\n"


def _wait_status(q, want: str) -> bool:
    """The RSP packet and QMP are separate sockets: poll (bounded) until QEMU reports ``want``."""
    import time
    for _ in range(200):
        if q.cmd("query-status")["status"] == want:
            return True
        time.sleep(0.05)
    return False
