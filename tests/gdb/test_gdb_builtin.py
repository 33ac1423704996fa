"""The gdb stub on the built-in SEV guest: real gdb for reads, writes, threads, Ctrl-C and
continue; a raw RSP client for the run-control details; starting it as QEMU does (--gdb,
HMP gdbserver), one gdb at a time, several in a row, and who can reach it."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import time

import pytest

from tests.conftest import RawClient, hmp, qmp_connect
from tests.gdb.gdb_support import RspClient, gdb_values, need_gdb, run_gdb


def _gdb_sock(d) -> str:
    return d.qmp.replace("qmp.sock", "gdb.sock")


def _wait_for(pred, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_gdb_on_the_builtin_guest_reads_writes_and_lists_vcpus(make_daemon):
    need_gdb()
    d = make_daemon("--gdb", "unix:gdb.sock")
    out = run_gdb(_gdb_sock(d), "p/x $pc", "p/x $cr3", "x/2gx 0x400000", "monitor x /2xg 0x400000",
                  "info threads", "monitor info registers",
                  "set {long}0x400008 = 0x1122334455667788", "x/2gx 0x400000", "monitor x /2xg 0x400000",
                  "monitor info sev-debug")
    vals = gdb_values(out)
    assert vals["$1"] == "0xffffffff81001000"
    assert f"CR3={int(vals['$2'], 16):016x}" in out       # monitor info registers agrees
    assert "0x400000:\t0x6761702072657375\t0x0000000000302065" in out          # "user pag" "e 0"
    assert "0000000000400000: 0x6761702072657375 0x0000000000302065" in out
    assert "* 1    Thread 1 (CPU#0" in out
    # the write went through DBG_ENCRYPT and the cache stayed coherent: HMP sees it at once
    assert "0x400000:\t0x6761702072657375\t0x1122334455667788" in out
    assert "0000000000400000: 0x6761702072657375 0x1122334455667788" in out
    assert re.search(r"bytes-encrypted: [1-9]", out)


def test_gdb_single_step_and_breakpoints_are_refused_clearly(make_daemon):
    need_gdb()
    d = make_daemon("--gdb", "unix:gdb.sock", "--no-workload")
    out = run_gdb(_gdb_sock(d), "stepi", "p/x $pc", "hbreak *0x400000", "continue")
    assert "single-step is not supported: this guest executes no instructions" in out
    assert "Remote failure reply: E01" in out
    assert "$1 = 0xffffffff81001000" in out          # still there: gdb knows it stopped
    assert "Could not insert hardware breakpoint" in out or "Cannot insert hardware breakpoint" in out


def test_ctrl_c_in_gdb_stops_the_running_workload_and_continue_resumes_it(make_daemon):
    need_gdb()
    d = make_daemon("--gdb", "unix:gdb.sock")
    q = qmp_connect(d)
    assert q.cmd("query-status")["status"] == "running"
    gdb = subprocess.Popen([need_gdb(), "-batch", "-nx", "-ex", "set architecture i386:x86-64",
                            "-ex", f"target remote {_gdb_sock(d)}", "-ex", "continue",
                            "-ex", "monitor info status", "-ex", "p/x $pc"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # attach stops the guest (STOP), gdb's continue resumes it (RESUME): then press Ctrl-C
        q.pull_event(wait=20)
        assert q.pull_event(wait=20)["event"] == "RESUME"
        # the workload maps and unmaps 0x600000 each time slice: a running guest shows both
        seen: set[str] = set()
        _wait_for(lambda: seen.add(hmp(q, "gva2gpa 0x600000")) or len(seen) == 2, "the workload to run")
        gdb.send_signal(signal.SIGINT)
        out, _ = gdb.communicate(timeout=30)
    finally:
        if gdb.poll() is None:
            gdb.kill()
    assert "Program received signal SIGINT, Interrupt." in out, out
    assert "VM status: paused" in out
    assert "$1 = 0xffffffff81001000" in out
    assert [e["event"] for e in q.get_events(wait=False)][:1] == ["STOP"]
    # gdb detached at the end: the guest was running when it attached, so it runs again
    _wait_for(lambda: q.cmd("query-status")["status"] == "running", "resume on detach")
    q.close()


def test_stop_reply_comes_whoever_stops_the_guest(make_daemon):
    d = make_daemon("--gdb", "unix:gdb.sock")
    q = qmp_connect(d)
    c = RspClient(_gdb_sock(d))
    assert c.ask("qSupported:multiprocess+;swbreak+") == "PacketSize=1000;qXfer:features:read+;vContSupported+"
    assert c.ask("?") == "T05thread:01;"
    assert q.cmd("query-status")["status"] == "paused"   # attaching stopped it
    assert c.ask("vCont?") == "vCont;c;C"
    c.send("vCont;c")
    _wait_for(lambda: q.cmd("query-status")["status"] == "running", "vCont;c")
    c.send_raw(b"\x03")
    assert c.recv() == "T02thread:01;"
    assert q.cmd("query-status")["status"] == "paused"
    c.send("c")
    _wait_for(lambda: q.cmd("query-status")["status"] == "running", "c")
    q.cmd("stop")                                     # a QMP user stops it: gdb hears of it
    assert c.recv() == "T02thread:01;"
    c.send_raw(b"\x03")                               # Ctrl-C while stopped: nothing to report
    assert c.ask("qC") == "QC01"
    assert c.ask("qfThreadInfo") == "m01" and c.ask("qsThreadInfo") == "l"
    assert c.ask("Hg1") == "OK" and c.ask("Hg2") == "E22" and c.ask("T1") == "OK" and c.ask("T2") == "E22"
    assert c.ask("qAttached") == "1"
    assert c.ask("Z0,400000,1") == "" and c.ask("Z1,400000,1") == ""
    assert c.ask("m400000,8") == "7573657220706167"
    assert c.ask("m400000") == "E22" and c.ask("mzz,8") == "E22" and c.ask("m0,99999") == "E22"
    assert c.ask("qqemu.PhyMemMode") == "0" and c.ask("Qqemu.PhyMemMode:2") == "E22"
    assert c.ask("D") == "OK"
    c.close()
    # it was running when gdb attached: detaching resumes it
    _wait_for(lambda: q.cmd("query-status")["status"] == "running", "resume on detach")
    q.close()


def test_each_distinct_page_costs_at_most_one_round_trip_while_paused(make_daemon):
    d = make_daemon("--gdb", "unix:gdb.sock")
    c = RspClient(_gdb_sock(d))

    def round_trips() -> int:
        c.send("qRcmd," + b"info sev-debug".hex())
        text = ""
        while (p := c.recv()) != "OK":
            text += bytes.fromhex(p[1:]).decode()
        return int(re.search(r"round-trips: (\d+)", text).group(1))

    c.ask("m400000,8")                    # the page tables on the way are now cached
    base = round_trips()
    for page in range(0x400000, 0x410000, 0x1000):       # 16 pages, 8 bytes a packet (gdb-sized)
        for off in range(0, 0x1000, 64):
            assert len(c.ask(f"m{page + off:x},8")) == 16
    first = round_trips() - base
    assert first <= 16, first
    for page in range(0x400000, 0x410000, 0x1000):
        c.ask(f"m{page:x},800")
    assert round_trips() - base == first    # a second look at paused pages is free
    c.close()


def test_one_gdb_at_a_time_and_several_in_a_row(make_daemon):
    d = make_daemon("--gdb", "unix:gdb.sock")
    first = RspClient(_gdb_sock(d))
    assert first.ask("?") == "T05thread:01;"
    second = RspClient(_gdb_sock(d), timeout=10)
    try:
        second.recv()
        raise AssertionError("a second gdb was served")
    except (EOFError, ConnectionError):
        pass
    assert first.ask("m400000,8") == "7573657220706167"      # the first is undisturbed
    assert first.ask("D") == "OK"
    first.close()
    for _ in range(3):                                        # then one after another
        _wait_for(lambda: "gdb stub: refused" in d.output(), "the refusal to be logged")
        c = RspClient(_gdb_sock(d))
        assert c.ask("qC") == "QC01"
        assert c.ask("D") == "OK"
        c.close()
    q = qmp_connect(d)
    assert q.cmd("query-status")["status"] in ("running", "paused")
    q.close()


def test_hmp_gdbserver_starts_moves_and_stops_the_stub(make_daemon, tmp_path):
    need_gdb()
    d = make_daemon("--no-workload")
    q = qmp_connect(d)
    path = str(tmp_path / "stub.sock")
    assert hmp(q, f"gdbserver unix:{path}") == f"Waiting for gdb connection on device 'unix:{path}'\r\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert "$1 = 0xffffffff81001000" in run_gdb(path, "p/x $pc")
    assert "gdbserver [device] -- start gdbserver on given device (default 'tcp::1234'), stop with 'none'" \
        in hmp(q, "help gdbserver")
    assert hmp(q, "gdbserver tcp:127.0.0.1:99999") == "Could not open gdbserver on device 'tcp:127.0.0.1:99999'\r\n"
    assert hmp(q, "gdbserver nonsense") == "Could not open gdbserver on device 'nonsense'\r\n"
    assert "$1 = 0xffffffff81001000" in run_gdb(path, "p/x $pc")      # the old device stays
    moved = str(tmp_path / "moved.sock")
    assert hmp(q, f"gdbserver unix:{moved}") == f"Waiting for gdb connection on device 'unix:{moved}'\r\n"
    assert not os.path.exists(path) and "$1 = 0xffffffff81001000" in run_gdb(moved, "p/x $pc")
    assert hmp(q, "gdbserver none") == "Disabled gdbserver\r\n"
    assert not os.path.exists(moved)
    assert q.cmd("query-status")["status"] == "running"      # it ran before gdb came, and after
    q.close()


def test_tcp_stub_binds_loopback_and_warns_once_on_a_debuggable_sev_guest(make_daemon):
    need_gdb()
    d = make_daemon("--gdb", "tcp::0", "--no-workload")
    m = re.search(r"gdb stub listening on tcp:([\d.]+):(\d+)", d.output())
    assert m and m.group(1) == "127.0.0.1"
    assert d.output().count(f"every process of uid {os.geteuid()} (and root) can now read its plaintext") == 1
    assert "$1 = 0xffffffff81001000" in run_gdb(f"127.0.0.1:{m.group(2)}", "p/x $pc")
    quiet = make_daemon("--gdb", "unix:gdb.sock", "--no-workload")
    nodbg = make_daemon("--gdb", "tcp::0", "--policy", "1", "--no-workload")
    assert "plaintext" not in quiet.output() and "plaintext" not in nodbg.output()


@pytest.mark.parametrize("device, line", [
    ("serial:/dev/ttyS0", "serial:/dev/ttyS0: expected tcp:[HOST]:PORT (PORT 0..65535), unix:PATH or none"),
    ("foo:1234", "foo:1234: expected tcp:[HOST]:PORT (PORT 0..65535), unix:PATH or none"),
    ("tcp::99999", "tcp::99999: port 99999 is out of range (accepted: 0..65535)"),
    ("tcp:localhost", "tcp:localhost: expected tcp:[HOST]:PORT, PORT 0..65535"),
])
def test_bad_gdb_device_is_one_line_naming_the_option_and_exit_2(tmp_path, device, line):
    """A bad --gdb value is a bad option value: one line naming the option and the range, exit 2, nothing left."""
    out = subprocess.run(["python3", "-m", "sevmon", "serve", "--qmp", str(tmp_path / "q.sock"),
                          "--gdb", device], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"sevmon serve: error: argument --gdb: {line}"]
    assert not (tmp_path / "q.sock").exists()


def test_quit_while_gdb_waits_is_reported_as_exit(make_daemon):
    d = make_daemon("--gdb", "unix:gdb.sock", "--no-workload")
    q = RawClient(d.qmp)
    q.negotiate()
    c = RspClient(_gdb_sock(d))
    assert c.ask("?") == "T05thread:01;"
    c.send("c")
    _wait_for(lambda: q.cmd("query-status")["return"]["status"] == "running", "c")
    assert q.cmd("quit") == {"return": {}}
    try:
        assert c.recv() == "W00"        # gdb: [Inferior 1 (Remote target) exited normally]
    except EOFError:
        raise AssertionError("no W00: " + d.output()) from None
    c.close()
    q.close()
    assert d.proc.wait(20) == 0
