"""Real gdb on the built-in SEV-ES guest, whose registers are encrypted in its VMSAs.

gdb 13 in all-stop mode cannot take an ordinary stop without a PC (``PC register is not available``, and
``target remote`` drops the target); the stub reports the stop at connect as one gdb takes without reading a
register (sevmon/gdb/no_registers.py). So gdb connects, prints ``<unavailable>`` for every register of every
vCPU (never a value), and reads kernel memory walked from the kernel's own tables (VMCOREINFO's
``init_top_pgt``), byte for byte what sevmon's HMP ``x`` prints; a user address is gdb's ``Cannot access
memory``. A plain SEV guest keeps the ordinary stop and its real PC.
"""

from __future__ import annotations

import re
import time

from tests.conftest import hmp, qmp_connect
from tests.gdb.gdb_support import RspClient, gdb_values, gdb_x_words, need_gdb, run_gdb

DROPPED = ("PC register is not available", "PC not available", "Remote connection closed", "The program is not being run",
           "No registers.")


def _gdb_sock(d) -> str:
    return d.qmp.replace("qmp.sock", "gdb.sock")


def _hmp_words(text: str) -> list[int]:
    """The values of an HMP ``x /Nxg`` answer, in order."""
    return [int(w, 16) for line in text.splitlines() for w in line.partition(":")[2].split()]


def _kernel_addresses(q, count: int = 3) -> list[int]:
    """The first address of the first ``count`` kernel ranges of ``info mem`` (the kernel's own tables)."""
    starts = [int(ln.split("-")[0], 16) for ln in hmp(q, "info mem").splitlines() if ln]
    kernel = [a for a in starts if a >> 63]
    assert len(kernel) >= count, kernel
    return kernel[:count]


def test_target_remote_succeeds_and_every_register_is_unavailable(make_daemon):
    need_gdb()
    d = make_daemon("--policy", "0x4", "--smp", "2", "--gdb", "unix:gdb.sock")
    out = run_gdb(_gdb_sock(d), "info threads", "p $rip", "p $rax", "p $cr3", "info registers",
                  "thread 2", "p $rsp", "info registers rip", "bt")
    assert not [m for m in DROPPED if m in out], out
    assert "Thread 1 (CPU#0" in out and "Thread 2 (CPU#1" in out
    assert gdb_values(out) == {"$1": "<unavailable>", "$2": "<unavailable>", "$3": "<unavailable>",
                               "$4": "<unavailable>"}
    rows = [ln.split() for ln in out.splitlines() if re.match(r"^(r[a-z0-9]+|e[a-z]+|[c-gs]s|cr\d|k?[fg]s_base) ", ln)]
    names = {r[0] for r in rows}
    assert {"rax", "rsp", "rip", "eflags", "cs", "cr3", "efer", "fs_base"} <= names
    assert all(r[1:] == ["<unavailable>"] for r in rows), rows     # no value, stale or made up
    assert "#0  <unavailable> in ?? ()" in out


def test_kernel_memory_equals_hmp_x_walked_from_the_kernels_own_tables(make_daemon):
    need_gdb()
    d = make_daemon("--policy", "0x4", "--gdb", "unix:gdb.sock")
    q = qmp_connect(d)
    try:
        addrs = _kernel_addresses(q)
        want = {a: _hmp_words(hmp(q, f"x /4xg {a:#x}")) for a in addrs}
        text = bytes(_hmp_words(hmp(q, "x /32xb 0xffffffff81000000")))
    finally:
        q.close()
    out = run_gdb(_gdb_sock(d), *[f"x/4gx {a:#x}" for a in addrs], "x/s 0xffffffff81000000", "x/4gx 0x400000")
    assert not [m for m in DROPPED if m in out], out
    for a in addrs:
        assert gdb_x_words(out, a) == want[a] and len(want[a]) == 4, (hex(a), out)
    string = text.split(b"\0")[0].split(b"\x90")[0].decode()
    assert string == "kernel text +0x0"
    assert f'0xffffffff81000000:\t"{string}' in out
    assert any(any(w) for w in want.values())
    assert "Cannot access memory at address 0x400000" in out   # a user address needs a process's CR3


def test_the_guest_runs_only_when_the_monitor_says_and_detach_leaves_it_as_found(make_daemon):
    """gdb itself refuses ``continue``/``stepi`` without a PC (nothing reaches the stub); ``monitor cont`` runs
    the guest and memory stays readable; detaching resumes a guest that ran before gdb came; a second gdb
    connects after the first quits."""
    need_gdb()
    d = make_daemon("--policy", "0x4", "--gdb", "unix:gdb.sock")
    q = qmp_connect(d)
    try:
        assert q.cmd("query-status")["status"] == "running"
        out = run_gdb(_gdb_sock(d), "continue", "stepi", "monitor info status", "set $rax = 1", "p $rax",
                      "monitor cont", "monitor info status", "x/2gx 0xffffffff81000000", "monitor stop", "detach")
        assert "PC register is not available" in out            # gdb's own words for continue
        assert "VM status: paused" in out and "VM status: running" in out
        assert 'Could not write register "rax"' in out and "$1 = <unavailable>" in out
        assert "0xffffffff81000000:\t0x74206c656e72656b\t0x3078302b20747865" in out   # "kernel text +0x0"
        assert "[Inferior 1 (Remote target) detached]" in out
        deadline = time.monotonic() + 20
        while q.cmd("query-status")["status"] != "running":   # it ran when gdb attached: detach resumed it
            assert time.monotonic() < deadline, "resume on detach"
            time.sleep(0.02)
        again = run_gdb(_gdb_sock(d), "p $pc", "quit")
        assert "$1 = <unavailable>" in again and not [m for m in DROPPED if m in again], again
    finally:
        q.close()


def test_only_a_guest_without_readable_registers_gets_the_quiet_stop(make_daemon):
    """The stop reply at connect: SEV-ES's names the ``library`` reason gdb takes without a PC; a plain SEV
    guest's is the ordinary one, and gdb reads its real PC."""
    need_gdb()
    replies = {}
    for policy in ("0x4", "0x0"):
        d = make_daemon("--policy", policy, "--gdb", "unix:gdb.sock")
        c = RspClient(_gdb_sock(d))
        try:
            replies[policy] = c.ask("?")
        finally:
            c.close()
        if policy == "0x0":
            out = run_gdb(_gdb_sock(d), "p/x $pc")
            assert gdb_values(out)["$1"] == "0xffffffff81001000"
    assert replies == {"0x4": "T05library:;thread:01;", "0x0": "T05thread:01;"}
