"""``sevmon drgn`` on a real Linux guest (Debian's cloud kernel under QEMU 7.2 TCG), with Debian's debug vmlinux.

One boot, paused for the whole module. The truth is drgn on QEMU's own ``dump-guest-memory`` of that paused
guest (tests/live/drgn_truth.py: QEMU's ELF segments, VMCOREINFO by page-head scan); the same drgn script
(drgn_tasks_dmesg.py: release, tasks, dmesg) runs through ``sevmon drgn`` against (a) sevmon attached to the live
QEMU and (b) QEMU's dump opened in sevmon as an SEV and as an SEV-ES guest (every byte through DBG_DECRYPT), and
must print what drgn prints on QEMU's bytes. Then: each distinct page is decrypted once (query-sev-debug-stats),
the console and stdin modes, and the client's page cache dropped when the guest runs.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from sevmon.testing import SevmonDaemon
from tests.live.conftest import Attached
from tests.live.drgn_truth import SCRIPT, VIEW

PAGE = 4096


def sevmon_drgn(socket: str, vmlinux: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sevmon", "drgn", socket, "-s", str(vmlinux), *args],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": os.getcwd()},
                          **kw)


def drgn_script(socket: str, vmlinux: Path, out: Path) -> dict:
    r = sevmon_drgn(socket, vmlinux, SCRIPT, str(out), "--an-arg", stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def guest(paused_linux, module_tmp):
    """The session's paused Linux guest, with sevmon attached to its live QEMU for this module."""
    att = Attached(module_tmp, paused_linux.qemu.a, hmp=False)
    try:
        yield SimpleNamespace(tmp=module_tmp, vmlinux=paused_linux.vmlinux, qemu=paused_linux.qmp,
                              dump=paused_linux.dump, truth=paused_linux.truth, attached=att)
    finally:
        att.stop()


def assert_same_kernel_view(got: dict, truth: dict) -> None:
    assert {k: got[k] for k in VIEW} == truth


def test_attached_to_the_live_qemu(guest):
    got = drgn_script(guest.attached.qmp_path, guest.vmlinux, guest.tmp / "attached.json")
    assert got["argv"] == [SCRIPT, str(guest.tmp / "attached.json"), "--an-arg"]   # as drgn SCRIPT ARGS sets it
    assert_same_kernel_view(got, guest.truth)
    assert got["reader"]["requests"] == got["reader"]["pages"] < got["reader"]["reads"]  # each page asked once


def test_a_vmlinux_that_is_not_the_guest_kernels(guest):
    """drgn itself only logs that it ignores such a file (and then finds no kernel symbols): one sentence instead."""
    r = sevmon_drgn(guest.attached.qmp_path, Path(sys.executable), SCRIPT, str(guest.tmp / "never.json"),
                    stdin=subprocess.DEVNULL)
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == (f"sevmon drgn: {sys.executable} is not the debug vmlinux of the guest's kernel "
                        f"{guest.truth['release']} (no debug info with the kernel's build ID)\n")
    assert not (guest.tmp / "never.json").exists()


@pytest.mark.parametrize("policy", ["0x0", "0x4"], ids=["sev", "sev-es"])
def test_qemus_dump_opened_as_an_sev_guest(guest, policy):
    with SevmonDaemon("--core", str(guest.dump), "--sev", "--policy", policy, start_timeout=600) as d:
        q = d.qmp
        q.cmd("query-guest-kernel")  # the VMCOREINFO scan, before the counts
        s0 = q.cmd("query-sev-debug-stats")
        got = drgn_script(d.qmp_path, guest.vmlinux, guest.tmp / f"core-{policy}.json")
        s1 = q.cmd("query-sev-debug-stats")
        assert_same_kernel_view(got, guest.truth)
        if policy != "0x0":
            return
        # each distinct page drgn needed was decrypted exactly once: the client asked for each page once, and the
        # daemon decrypted each of them once
        pages = got["reader"]["pages"]
        assert got["reader"]["requests"] == pages
        assert s1["bytes-decrypted"] - s0["bytes-decrypted"] == pages * PAGE
        assert s1["cache-misses"] - s0["cache-misses"] == pages
        # a second run (a new client, its own cache empty) while the guest stays paused decrypts nothing: its round
        # trips are only those of query-sev/query-sev-capabilities (the C-bit), which the first run made too
        again = drgn_script(d.qmp_path, guest.vmlinux, guest.tmp / "core-again.json")
        s2 = q.cmd("query-sev-debug-stats")
        assert again["dmesg"] == got["dmesg"] and again["reader"]["pages"] == pages
        assert s2["bytes-decrypted"] == s1["bytes-decrypted"] and s2["cache-misses"] == s1["cache-misses"]
        assert s2["cache-hits"] - s1["cache-hits"] == pages + 1  # and its VMCOREINFO page
        assert (s1["round-trips"] - s0["round-trips"]) - (s2["round-trips"] - s1["round-trips"]) == pages


def test_stdin_and_the_interactive_console(guest):
    release = guest.truth["release"]
    init = dict(guest.truth["tasks"])[1]
    r = sevmon_drgn(guest.attached.qmp_path, guest.vmlinux,
                    input="print(prog['UTS_RELEASE'].string_().decode(), len(list(for_each_task())))\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{release} {len(guest.truth['tasks'])}\n"
    # no script, a terminal: drgn's console, prog and drgn's Linux helpers ready
    main, sub = pty.openpty()
    p = subprocess.Popen([sys.executable, "-m", "sevmon", "drgn", guest.attached.qmp_path, "-s", str(guest.vmlinux)],
                         stdin=sub, stdout=sub, stderr=sub, env={**os.environ, "PYTHONPATH": os.getcwd(),
                                                                  "HOME": str(guest.tmp)})
    os.close(sub)
    out = b""

    def until(marker: bytes) -> None:
        nonlocal out
        while marker not in out:
            ready, _, _ = select.select([main], [], [], 120)
            assert ready, out
            out += os.read(main, 65536)
    try:
        until(b"import *\r\n>>> ")  # the banner's last line, then the first prompt
        banner = out
        os.write(main, b"prog['UTS_RELEASE'].string_().decode() + '|' + find_task(1).comm.string_().decode()\n")
        answer = f"'{release}|{init}'".encode()
        until(answer)
        out = out[out.index(answer):]
        until(b">>> ")  # the console reads again: end it as a user does, Ctrl-D on an empty line
        os.write(main, b"\x04")
        assert p.wait(180) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        os.close(main)
    assert b"For help, type help(drgn)." in banner and b"from drgn.helpers.linux import *" in banner


def test_the_client_cache_is_dropped_when_the_guest_runs(guest):
    """Last: it lets the guest run (and pauses it again). While paused, a second read is the client's (no
    request); QEMU's ``cont`` on its own monitor reaches sevmon's clients as RESUME, and drgn then sees the guest
    move (jiffies advance) instead of the page it kept."""
    from sevmon.drgn import program
    prog = program(guest.attached.qmp_path, vmlinux=guest.vmlinux)
    reader = prog.config["sevmon_reader"]
    j0 = prog["jiffies"].value_()
    asked = reader.requests
    assert prog["jiffies"].value_() == j0 and reader.requests == asked
    guest.qemu.cmd("cont")
    try:
        deadline = time.monotonic() + 120
        while prog["jiffies"].value_() == j0:
            assert time.monotonic() < deadline, "drgn kept seeing the paused guest's jiffies"
    finally:
        guest.qemu.cmd("stop")
    assert reader.requests > asked
