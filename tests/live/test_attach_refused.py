"""``--debug-policy off`` on a live QEMU 7.2 guest: nothing that reads guest memory reaches QEMU. The commands
sevmon passes on to QEMU (``x /i``, ``xp /i``, ``sum``, ``migrate``, ``savevm``, QMP ``migrate`` and
``snapshot-save``) are refused in QEMU's words, and sevmon's own (``x``, ``dump-guest-memory``...) refuse as
the debug layer does; QEMU's other monitor shows that none of them ran. One boot per module."""

from __future__ import annotations

import contextlib

import pytest

from sevmon.testing import HMPSocket
from tests.live.conftest import Attached, Qemu, hmp

REASON = "debug access is disabled by the security policy (--debug-policy off)"


@pytest.fixture(scope="module")
def live(module_tmp):
    qemu = Qemu(module_tmp, mem="1G")
    sevmon = Attached(module_tmp, qemu.a, extra=["--debug-policy", "off"])
    assert sevmon.proc.poll() is None, sevmon.output()
    theirs, ours = qemu.qmp("b"), sevmon.qmp()
    theirs.cmd("stop")
    yield qemu, sevmon, theirs, ours
    for q in (theirs, ours):
        with contextlib.suppress(Exception):
            q.close()
    sevmon.stop()
    qemu.stop()


def test_disassembly_and_checksum_are_refused(live):
    qemu, sevmon, theirs, ours = live
    rip = int(hmp(theirs, "info registers").split("RIP=")[1].split()[0], 16)
    assert "unable to read memory" not in hmp(theirs, f"x /3i {rip:#x}")  # QEMU itself would show the code
    # QEMU's words for memory a disassembly cannot read
    assert hmp(ours, f"x /3i {rip:#x}") == f"{rip:#x}: unable to read memory\r\n"
    assert hmp(ours, "x /2i $rip") == f"{rip:#x}: unable to read memory\r\n"
    assert hmp(ours, "xp /4i 0x1000") == "0x1000: unable to read memory\r\n"
    assert hmp(ours, "sum 0 4096") == f"Error: {REASON}\r\n"
    # sevmon's own memory commands refuse through the debug layer, as without QEMU
    assert hmp(ours, "x /2xg $rip") == f"{rip:016x}: Cannot access memory\r\n"
    assert hmp(ours, "info mem") == f"Error: {REASON}\r\n"
    # the rest is still QEMU's
    assert hmp(ours, "info status") == hmp(theirs, "info status")


def test_migration_and_snapshots_are_refused_and_never_reach_qemu(live, tmp_path):
    qemu, sevmon, theirs, ours = live
    out = tmp_path / "guest.stream"
    assert hmp(ours, f'migrate "exec:cat > {out}"') == f"Error: {REASON}\r\n"
    assert hmp(ours, f'migrate -d "exec:cat > {out}"') == f"Error: {REASON}\r\n"
    refused = {"class": "GenericError", "desc": REASON}
    assert ours.cmd_raw("migrate", {"uri": f"exec:cat > {out}"})["error"] == refused
    assert ours.cmd_raw("human-monitor-command", {"command-line": f"migrate exec:cat>{out}"}) == {
        "return": f"Error: {REASON}\r\n"}
    assert hmp(ours, "savevm snap1") == f"Error: {REASON}\r\n"
    assert ours.cmd_raw("snapshot-save", {"job-id": "s1", "tag": "snap1", "vmstate": "none",
                                          "devices": []})["error"] == refused
    assert not out.exists()
    assert theirs.cmd("query-migrate") == {}          # QEMU never started a migration
    assert theirs.cmd("query-jobs") == []             # nor a snapshot job
    assert hmp(theirs, "info status") == "VM status: paused\r\n"


def test_dumps_are_refused(live, tmp_path):
    qemu, sevmon, theirs, ours = live
    core = tmp_path / "guest.elf"
    assert hmp(ours, f"dump-guest-memory {core}") == f"Error: {REASON}\r\n"
    assert ours.cmd_raw("dump-guest-memory", {"paging": False, "protocol": f"file:{core}"})["error"] == {
        "class": "GenericError", "desc": REASON}
    assert not core.exists()
    assert hmp(theirs, "info status") == "VM status: paused\r\n"


def test_the_hmp_socket_refuses_as_qmp_does(live):
    qemu, sevmon, theirs, ours = live
    with HMPSocket(sevmon.hmp_path) as s:
        assert s.run("sum 0x1000 16") == f"Error: {REASON}\r\n"
        assert s.run("xp /i 0x1000") == "0x1000: unable to read memory\r\n"
