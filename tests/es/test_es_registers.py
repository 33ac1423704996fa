"""An SEV-ES guest's registers are encrypted in its VMSA: sevmon says so and shows no value anywhere.

QEMU 7.2 skips the register sync for such a guest and prints its cached reset state with no warning; sevmon
prints the sentence instead (``info registers``), gdb gets RSP's ``xx`` bytes and prints ``<unavailable>``, and every
command that would start from a register (``$rip``) refuses in that sentence; walks start from the kernel's own tables. Memory stays readable
through DBG_DECRYPT (the policy allows debugging).
"""

from __future__ import annotations

import re

from tests.conftest import hmp, qmp_connect
from tests.gdb.gdb_support import RspClient, need_gdb, run_gdb

SENTENCE = "the vCPU register state of this SEV-ES guest is encrypted in its VMSA"
VALUE = re.compile(r"\b(RAX|RIP|EIP|CR3|EFER|ES |CS )=")


def test_info_registers_says_encrypted_and_prints_no_value(make_daemon):
    d = make_daemon("--policy", "0x4", "--smp", "2")
    q = qmp_connect(d)
    try:
        one = hmp(q, "info registers")
        every = hmp(q, "info registers -a")
        cpus = q.cmd_obj({"execute": "query-cpus-fast"})["return"]
    finally:
        q.close()
    assert "CPU#0" in one and SENTENCE in one and not VALUE.search(one)
    assert "CPU#0" in every and "CPU#1" in every and every.count(SENTENCE) == 2 and not VALUE.search(every)
    assert [c["cpu-index"] for c in cpus] == [0, 1]   # QEMU's fields only: no register there to go stale
    assert all(set(c) == {"thread-id", "props", "qom-path", "cpu-index", "target"} for c in cpus)


def test_register_expressions_refuse_in_one_sentence(make_daemon):
    d = make_daemon("--policy", "0x4")
    q = qmp_connect(d)
    try:
        for cmd in ("print $rip", "x /2xg $rsp", "xp /2xg $cr3"):
            out = hmp(q, cmd)
            assert out.startswith("Error: ") and SENTENCE in out and out.count("\n") <= 1, (cmd, out)
    finally:
        q.close()


def test_walks_start_from_the_kernels_own_tables_never_from_a_cr3(make_daemon, tmp_path):
    """No CR3 is known, so every walk starts from the Linux kernel's own root (found through its VMCOREINFO):
    the kernel half of what the same guest shows as plain SEV, where CR3 is known. A user address, which would
    need a process's CR3, is refused in one sentence; physical reads go on through DBG_DECRYPT."""
    plain = make_daemon("--policy", "0x0")
    q = qmp_connect(plain)
    try:
        kernel_half = {cmd: [ln for ln in hmp(q, cmd).splitlines(keepends=True) if int(ln[:16], 16) >> 63]
                       for cmd in ("info mem", "info tlb")}
        x = hmp(q, "x /2xg 0xffffffff81000000")
    finally:
        q.close()
    d = make_daemon("--policy", "0x4")
    q = qmp_connect(d)
    try:
        for cmd, lines in kernel_half.items():
            assert lines and hmp(q, cmd) == "".join(lines), cmd
        assert hmp(q, "x /2xg 0xffffffff81000000") == x
        for cmd in ("x /2xg 0x400000", f'memsave 0x400000 4096 "{tmp_path / "m.bin"}"'):
            out = hmp(q, cmd)
            assert out.startswith("Error: ") and "is a user address" in out and out.count("\n") <= 1, (cmd, out)
        assert not (tmp_path / "m.bin").exists()
        assert hmp(q, "xp /16c 0x1000000").split(":")[1].strip().startswith("'k' 'e' 'r' 'n' 'e' 'l'")
    finally:
        q.close()


def test_gdb_stub_reports_every_register_unavailable(make_daemon):
    """RSP's ``xx`` for every byte of ``g`` and ``p``; writes refused; the stop at connect is the one gdb takes
    without a PC (real gdb's view: tests/gdb/test_gdb_sev_es.py)."""
    need_gdb()
    d = make_daemon("--policy", "0x4", "--smp", "2", "--gdb", "unix:gdb.sock")
    sock = d.qmp.replace("qmp.sock", "gdb.sock")
    c = RspClient(sock)
    try:
        c.send("?")
        assert c.recv() == "T05library:;thread:01;"
        c.send("g")
        g = c.recv()
        assert g and set(g) == {"x"}                       # every byte unavailable
        c.send("p10")                                      # rip (regnum 16 in the x86-64 description)
        assert c.recv() == "x" * 16
        c.send("Hg2")
        assert c.recv() == "OK"
        c.send("p0")                                       # the AP's rax: unavailable too
        assert c.recv() == "x" * 16
        c.send("P0=0100000000000000")
        assert c.recv().startswith("E")
        c.send("G" + "00" * (len(g) // 2))
        assert c.recv().startswith("E")
    finally:
        c.close()
    out = run_gdb(sock, "p $pc", "info registers rip")
    assert "$1 = <unavailable>" in out and re.search(r"^rip +<unavailable>$", out, re.M)
    assert not re.search(r"0x[0-9a-f]+", out)              # no value anywhere


def test_dump_guest_memory_carries_no_register_notes(make_daemon, tmp_path):
    """QEMU 7.2 would write its stale reset state into NT_PRSTATUS; sevmon's core has the memory only."""
    d = make_daemon("--policy", "0x4", "--smp", "2")
    core = tmp_path / "es.core"
    q = qmp_connect(d)
    try:
        r = q.cmd_obj({"execute": "dump-guest-memory", "arguments": {"paging": False, "protocol": f"file:{core}"}})
        assert r == {"return": {}}
        assert q.cmd_obj({"execute": "query-dump"})["return"]["status"] == "completed"
    finally:
        q.close()
    data = core.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2          # ELF64, as for any 64-bit guest
    head = data[:0x10000]
    assert b"CORE\0" not in head and b"QEMU\0" not in head   # no NT_PRSTATUS, no QEMUCPUState
    assert b"kernel text +0x0" in data                      # the memory itself, decrypted


def test_migration_of_an_sev_es_guest_is_refused_in_one_sentence(make_daemon, tmp_path):
    """Its registers would have to travel (SEND_UPDATE_VMSA): sevmon sends none rather than made-up ones."""
    d = make_daemon("--policy", "0x4")
    q = qmp_connect(d)
    try:
        r = q.cmd_obj({"execute": "migrate", "arguments": {"uri": f"unix:{tmp_path / 'm.sock'}"}})
        assert r["error"]["desc"].startswith("sevmon does not migrate SEV-ES guests")
    finally:
        q.close()
