"""sevmon attached to a live QEMU 7.2 (4-level paging, 4 GiB: RAM above 4 GiB): on the
same paused guest sevmon's memory commands equal QEMU's own, byte for byte; everything
else is QEMU's answer; events reach every client; quit ends both. One boot per module."""

from __future__ import annotations

import asyncio
import contextlib
import threading

import pytest
from qemu.qmp import QMPClient

from sevmon.machine.images import load_core
from sevmon.testing import HMPSocket
from tests.live.conftest import Attached, Qemu, hmp


@pytest.fixture(scope="module")
def live(module_tmp):
    # QEMU traces every QMP command and HMP line it runs: what sevmon asks of QEMU, seen from QEMU's side
    qemu = Qemu(module_tmp, mem="4G", extra=["-trace", "qmp_enter_*", "-trace", "handle_hmp_command",
                                             "-D", str(module_tmp / "trace.log")])
    sevmon = Attached(module_tmp, qemu.a)
    assert sevmon.proc.poll() is None, sevmon.output()
    theirs, ours = qemu.qmp("b"), sevmon.qmp()
    yield qemu, sevmon, theirs, ours
    for q in (theirs, ours):
        with contextlib.suppress(Exception):  # QEMU may have quit already
            q.close()
    sevmon.stop()
    qemu.stop()


def _commands(tlb: str) -> list[str]:
    """x / xp / gva2gpa lines over addresses the guest really maps (user, kernel, >4 GiB)."""
    lines = [ln for ln in tlb.split("\r\n") if ln and _is_ram(int(ln.split(": ")[1].split()[0], 16))]
    picks = [lines[0], lines[len(lines) // 3], lines[len(lines) // 2], lines[-1]]
    out = []
    for ln in picks:
        va, rest = ln.split(": ")
        gpa = int(rest.split()[0], 16)
        out += [f"gva2gpa 0x{va}", f"x /8xg 0x{va}", f"x /16xb 0x{int(va, 16) + 0x7f8:x}",
                f"xp /4xw 0x{gpa:x}", f"x /3i 0x{va}"]
    out += ["xp /4xg 0x100000000", "xp /2xg 0x13ffff000", "xp /2xg 0x140000000",
            "gva2gpa 0x1000", "x /2xg 0", "xp /2x 0xfff", "x /2xg $esp", "x /4xb $pc", "gva2gpa $esp"]
    return out


async def _concurrently(path: str, lines: list[str]) -> list[str]:
    """Several clients at once, each with its own command in flight."""
    clients = [QMPClient(f"c{i}") for i in range(len(lines))]
    for c in clients:
        await c.connect(path)
    try:
        return await asyncio.gather(*(c.execute("human-monitor-command", {"command-line": line})
                                      for c, line in zip(clients, lines, strict=True)))
    finally:
        for c in clients:
            await c.disconnect()


def _is_ram(gpa: int) -> bool:
    """4 GiB on pc: [0, 3 GiB) and [4 GiB, 5 GiB) (QEMU's flat view); MMIO is not RAM."""
    return gpa < 0xc0000000 or 1 << 32 <= gpa < 5 << 30


def _oracle(theirs, ours) -> int:
    tlb = hmp(theirs, "info tlb")
    assert tlb.count("\r\n") > 1000
    assert hmp(ours, "info tlb") == tlb
    assert hmp(ours, "info mem") == hmp(theirs, "info mem")
    checked = 0
    for line in _commands(tlb):
        cpu = 0 if "$" in line else None  # QEMU knows no $register without a selected vCPU
        assert hmp(ours, line, cpu) == hmp(theirs, line, cpu), line
        checked += 1
    return checked


def test_memory_commands_equal_qemus_on_the_paused_guest(live):
    qemu, sevmon, theirs, ours = live
    theirs.cmd("stop")
    regs = hmp(theirs, "info registers")
    assert "CR3=0000000" in regs and "EFER=" in regs
    assert any(int(ln.split(": ")[1].split()[0], 16) >= 1 << 32
               for ln in hmp(theirs, "info tlb").split("\r\n") if ln), "no mapping of RAM above 4 GiB"
    assert _oracle(theirs, ours) >= 25
    # device memory (the IOAPIC, the local APIC) is read by QEMU itself: QEMU's bytes
    for line in ("xp /2xg 0xfec00000", "xp /4xw 0xfee00020"):
        assert "Cannot access memory" not in hmp(ours, line)
        assert hmp(ours, line) == hmp(theirs, line), line
    stats = ours.cmd("query-sev-debug-stats")
    assert stats["cache-hits"] > 0  # the second walk on the paused guest came from the cache


def test_after_the_guest_ran_and_was_paused_again(live):
    qemu, sevmon, theirs, ours = live
    before = hmp(ours, "info tlb")
    theirs.cmd("cont")
    import time
    time.sleep(1.5)  # the guest's processes run (not a timing assertion)
    theirs.cmd("stop")
    assert hmp(ours, "info status") == "VM status: paused\r\n"
    assert _oracle(theirs, ours) >= 25
    assert hmp(ours, "info registers") == hmp(theirs, "info registers")
    del before


def _asked_of_qemu(qemu, fn) -> str:
    """What QEMU ran (its trace) while ``fn`` ran: sevmon is QEMU's only other client meanwhile."""
    log = qemu.tmp / "trace.log"
    start = log.stat().st_size
    fn()
    with open(log) as f:
        f.seek(start)
        return f.read()


def test_trips_to_qemu_only_where_needed(live, tmp_path):
    """No registers needed (xp, pmemsave, info sev-debug): no trip to QEMU at all. A guest that stayed
    paused: one query-status, not info registers. After another client's cont + stop: info registers again,
    and the answer is the guest's new one."""
    qemu, sevmon, theirs, ours = live
    theirs.cmd("stop")
    hmp(ours, "info mem")
    asked = _asked_of_qemu(qemu, lambda: [hmp(ours, "xp /2xg 0x1000"), hmp(ours, "info sev-debug"),
                                          hmp(ours, f"pmemsave 0x100000 0x10000 {tmp_path / 'p.bin'}")])
    assert asked == ""
    asked = _asked_of_qemu(qemu, lambda: hmp(ours, "info mem"))
    assert "qmp_enter_query_status" in asked and "info registers" not in asked, asked
    assert asked.count("qmp_enter_") == 1, asked
    theirs.cmd("cont")
    theirs.cmd("stop")
    asked = _asked_of_qemu(qemu, lambda: hmp(ours, "info tlb"))
    assert "info registers" in asked, asked
    assert hmp(ours, "info tlb") == hmp(theirs, "info tlb")


def test_forwarded_commands_are_qemus(live):
    qemu, sevmon, theirs, ours = live
    for name in ("query-pci", "query-block", "query-status", "query-version", "query-cpus-fast", "query-kvm"):
        assert ours.cmd(name) == theirs.cmd(name), name
    for line in ("info pci", "info mtree", "info registers", "info status", "info qtree", "help x",
                 "help info pci", "nosuchcommand 1", "info nosuchitem", "help nosuchcommand", ""):
        assert hmp(ours, line) == hmp(theirs, line), line
    # errors come back under the client's own id, QEMU's class and text
    for msg in ({"execute": "nosuch", "id": "mine"},
                {"execute": "query-pci", "arguments": {"bogus": 1}, "id": "7"},
                {"execute": "human-monitor-command", "arguments": {"command-line": "info pci", "cpu-index": 9},
                 "id": "x1"},
                {"execute": "qom-get", "arguments": {"path": "/machine", "property": "nope"}, "id": "n"},
                {"exec-oob": "query-status", "id": "o1"},   # OOB rules are QEMU's
                {"exec-oob": "query-yank", "id": "o2"}):
        assert ours.cmd_obj(msg) == theirs.cmd_obj(msg), msg
    # the greeting carries QEMU's version
    assert ours.cmd("query-version") == theirs.cmd("query-version")
    # sevmon's own commands are listed with QEMU's
    names = {c["name"] for c in ours.cmd("query-commands")}
    assert {"query-pci", "query-sev-debug-stats", "memsave"} <= names
    schema = ours.cmd("query-qmp-schema")
    cmds = {e["name"] for e in schema if e["meta-type"] == "command"}
    assert {"query-pci", "query-sev-debug-stats"} <= cmds
    assert len({e["name"] for e in schema}) == len(schema)
    # info kvm: QEMU's text, plus sevmon's memory-encryption line
    assert hmp(ours, "info kvm") == hmp(theirs, "info kvm") + "memory encryption: disabled\r\n"


def test_pmemsave_memsave_and_dump_equal_qemus_including_above_4g(live, tmp_path):
    qemu, sevmon, theirs, ours = live
    mine, qemus = tmp_path / "mine.bin", tmp_path / "qemus.bin"
    for addr in (0x1000, 0xbfff0000, 0x100000000):
        assert ours.cmd_raw("pmemsave", {"val": addr, "size": 0x20000, "filename": str(mine)}) == {"return": {}}
        assert theirs.cmd_raw("pmemsave", {"val": addr, "size": 0x20000, "filename": str(qemus)}) == {"return": {}}
        assert mine.read_bytes() == qemus.read_bytes()
    # three mapped pages in a row (the lowest mapping may be a stack page right below the non-canonical hole)
    pages = {int(ln.split(":")[0], 16) for ln in hmp(theirs, "info tlb").split("\r\n") if ln}
    va = next(v for v in sorted(pages) if v + 0x1000 in pages and v + 0x2000 in pages)
    for q, path in ((ours, mine), (theirs, qemus)):
        assert q.cmd_raw("memsave", {"val": va, "size": 0x3000, "filename": str(path)}) == {"return": {}}
    assert mine.read_bytes() == qemus.read_bytes()
    # dump-guest-memory (ELF) is sevmon's: a piece above 4 GiB, loaded back, equals QEMU's bytes
    core = tmp_path / "piece.elf"
    assert ours.cmd_raw("dump-guest-memory", {"paging": False, "protocol": f"file:{core}",
                                              "begin": 0x100000000, "length": 0x40000}) == {"return": {}}
    theirs.cmd_raw("pmemsave", {"val": 0x100000000, "size": 0x40000, "filename": str(qemus)})
    assert load_core(str(core)).ram.read(0x100000000, 0x40000) == qemus.read_bytes()


def test_hmp_socket_serves_sevmons_lines_and_qemus(live):
    qemu, sevmon, theirs, ours = live
    with HMPSocket(sevmon.hmp_path) as s:
        # QEMU's banner, as sevmon shell greets with it (sevmon stands in for QEMU's monitor)
        shell = _in_thread(_shell_view(sevmon.qmp_path))
        assert s.banner == shell["banner"] + "\r\n"
        assert s.banner.startswith("QEMU 7.2.")
        for line in ("info pci", "info mem", "info status", "gva2gpa 0x400000"):
            assert s.run(line) == hmp(theirs, line), line


async def _shell_view(path: str) -> dict:
    """What ``sevmon shell`` learns at connect time: its banner and its Tab completions."""
    from prompt_toolkit.completion import CompleteEvent
    from prompt_toolkit.document import Document

    from sevmon.shell.app import Monitor
    from sevmon.shell.banner import banner
    from sevmon.shell.completion import MonitorCompleter
    mon = Monitor(path)
    await mon.connect()
    try:
        completer = MonitorCompleter(mon.commands, mon.info)

        def tab(text: str) -> set[str]:
            return {c.text for c in completer.get_completions(Document(text), CompleteEvent(completion_requested=True))}
        return {"banner": banner(mon.client.greeting), "tab": {t: tab(t) for t in ("sev-m", "info sev-", "x", "info pc",
                                                                                  "help sev")}}
    finally:
        await mon.close()


def _in_thread(coro):
    """Run ``coro`` on a thread of its own: the legacy clients own this thread's event loop."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(asyncio.run(coro)))
    t.start()
    t.join(60)
    return out[0]


def _without(text: str, lines: list[str]) -> str:
    kept = text.split("\r\n")
    for line in lines:
        kept.remove(line)
    return "\r\n".join(kept)


SEV_MEM_MAP_HELP = "sev-mem-map filename -- draw the guest-physical memory as private/shared/aliased into the SVG file 'filename'"
INFO_GUEST_KERNEL_HELP = ("info guest-kernel  -- show the guest's Linux kernel as its VMCOREINFO describes it "
                          "(release, KASLR offset, page-table root)")
INFO_SEV_HELP = ["info sev-debug  -- show SEV debug-access statistics (round trips, cache)",
                 "info sev-mem  -- show the active virtual memory mappings as private (C-bit set) or shared, and the "
                 "frames mapped both ways"]


def test_help_and_completion_list_qemus_commands_and_sevmons(live):
    qemu, sevmon, theirs, ours = live
    # QEMU's own lines, in QEMU's (sorted) order, with sevmon's own commands among them
    mine = hmp(ours, "help")
    assert SEV_MEM_MAP_HELP in mine.split("\r\n")
    assert _without(mine, [SEV_MEM_MAP_HELP]) == hmp(theirs, "help")
    lines = [ln for ln in mine.split("\r\n") if ln[:1].isalnum()]  # not the continuation lines
    assert lines == sorted(lines, key=lambda ln: ln.split(" ")[0])
    info = hmp(ours, "help info")
    assert _without(info, [INFO_GUEST_KERNEL_HELP, *INFO_SEV_HELP]) == hmp(theirs, "help info")
    assert hmp(theirs, "info") == hmp(theirs, "help info")  # bare info lists the items, in QEMU ...
    assert hmp(ours, "info") == info                          # ... and here, sevmon's among them
    assert hmp(ours, "help sev-mem-map") == SEV_MEM_MAP_HELP + "\r\n"
    assert hmp(ours, "help info sev-mem") == INFO_SEV_HELP[1] + "\r\n"
    assert hmp(ours, "? info sev-debug") == INFO_SEV_HELP[0] + "\r\n"
    tab = _in_thread(_shell_view(sevmon.qmp_path))["tab"]
    assert tab["sev-m"] == {"sev-mem-map "}
    assert tab["info sev-"] == {"sev-debug ", "sev-mem "}
    assert tab["sev-m"] == tab["help sev"] == {"sev-mem-map "}
    assert tab["info sev-"] == {"sev-debug ", "sev-mem "}
    assert {"x ", "xp "} <= tab["x"] and tab["info pc"] == {"pci "}


def test_register_expressions_are_sevmons_in_every_command(live):
    qemu, sevmon, theirs, ours = live
    theirs.cmd("stop")
    regs = hmp(theirs, "info registers", 0)
    value = {k: int(v, 16) for k, v in (f.split("=") for f in regs.split() if f.count("=") == 1)
             if k in ("RSP", "RIP", "CR3") and v}
    assert hmp(theirs, "print $rsp", 0).startswith("unknown register")  # QEMU knows only its 32-bit names
    assert hmp(ours, "print /x $rsp") == f"{value['RSP']:#x}\r\n"
    assert hmp(ours, "p /d $cr3 + 8") == f"{value['CR3'] + 8}\r\n"
    # QEMU's commands that take expressions get the values sevmon computed
    cr3 = value["CR3"] & ~0xfff
    assert hmp(ours, "sum $cr3 & ~0xfff 4096") == hmp(theirs, f"sum {cr3:#x} 4096")
    assert hmp(ours, "gpa2hva $cr3 & ~0xfff") == hmp(theirs, f"gpa2hva {cr3:#x}")
    assert hmp(ours, "x /3i $rip") == hmp(theirs, f"x /3i {value['RIP']:#x}", 0)
    assert hmp(ours, "xp /2i $cr3 & ~0xfff") == hmp(theirs, f"xp /2i {cr3:#x}")
    assert hmp(ours, "x /2xg $rsp") == hmp(theirs, f"x /2xg {value['RSP']:#x}", 0)


def test_hmp_migrate_without_d_waits_for_the_end(live):
    """On sevmon's HMP socket, as on QEMU's interactive monitor, the prompt comes back when the migration has
    ended (QEMU's human-monitor-command would continue detached)."""
    qemu, sevmon, theirs, ours = live
    with HMPSocket(sevmon.hmp_path) as s:
        assert s.run('migrate "exec:cat > /dev/null"') == ""
        assert theirs.cmd_raw("query-migrate")["return"]["status"] == "completed"
        assert hmp(ours, "info status") == "VM status: paused (postmigrate)\r\n"


def test_events_reach_every_client_and_quit_ends_both(live):
    qemu, sevmon, theirs, ours = live
    ours.clear_events()  # the earlier tests' STOP/RESUME
    clients = [sevmon.qmp() for _ in range(3)] + [ours]
    theirs.cmd("cont")  # RESUME from QEMU's other monitor reaches every sevmon client
    events = [c.pull_event(wait=10) for c in clients]
    assert {e["event"] for e in events} == {"RESUME"}
    assert len({str(e["timestamp"]) for e in events}) == 1  # QEMU's own timestamp, relayed
    ours.cmd("stop")    # forwarded: QEMU stops, its STOP reaches every client
    for c in clients:
        assert c.pull_event(wait=10)["event"] == "STOP"
    lines = ["info mem", "info tlb", "info mem", "info pci"]
    results: list = []  # on a thread of its own: the legacy clients own this thread's event loop
    t = threading.Thread(target=lambda: results.extend(asyncio.run(_concurrently(sevmon.qmp_path, lines))))
    t.start()
    t.join(120)
    assert results == [hmp(theirs, line) for line in lines]
    assert clients[0].cmd_raw("quit") == {"return": {}}
    for c in clients:
        assert c.pull_event(wait=10)["event"] == "SHUTDOWN"
    for c in clients[:3]:
        with contextlib.suppress(Exception):
            c.close()
    assert sevmon.wait(30) == 0
    assert qemu.proc.wait(30) == 0
    import os
    assert not os.path.exists(sevmon.qmp_path) and not os.path.exists(sevmon.hmp_path)
