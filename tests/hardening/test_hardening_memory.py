"""Hardening of the memory path: firmware faults, resource bounds, dumps that fail or are
interrupted, and proof that no plaintext leaves when debugging is forbidden."""

from __future__ import annotations

import json
import os
import signal

import pytest

from sevmon.commands.registry import build
from sevmon.machine.builder import build_machine
from sevmon.machine.runner import MachineRunner
from sevmon.machine.spec import GuestSpec, SevSpec
from tests.conftest import FIXTURES, hmp, qmp_connect

FX = FIXTURES / "linux-4level"


def test_firmware_error_in_the_middle_of_a_multi_page_read():
    m = build_machine(GuestSpec(source="core", image=str(FX / "core.elf"), cpu_state=str(FX / "cpu.json"),
                                sev=SevSpec()))
    _, monitor = build(MachineRunner(m))
    expected = json.loads((FX / "hmp.json").read_text())["info tlb"].replace("\r\n", "\n")
    m.sev.kernel.fail_firmware_call(50, 0x13)  # the 50th PSP command from now: HWSEV_RET_PLATFORM
    out = monitor.run("info tlb")
    assert out.startswith("Error: SEV: DBG_DECRYPT failed") and out.count("\n") == 1, out
    cached = dict(m.memory.cache._pages)
    for pfn, page in cached.items():  # nothing partial: every cached page is a whole, true page
        assert len(page) == 4096 and page == m.sev.dbg_decrypt(pfn << 12, 4096)
    assert monitor.run("info tlb") == expected  # the next command works


def test_huge_xp_count_is_bounded_and_the_daemon_stays_small(make_daemon, tmp_path):
    raw = tmp_path / "ram.bin"
    raw.write_bytes(os.urandom(32 << 20))
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"cr0": "0x11", "cr3": "0x0", "cr4": "0x0", "efer": "0x0"}))
    d = make_daemon("--raw", str(raw), "--cpu-state", str(cpu), "--sev", hmp=False)
    q = qmp_connect(d)
    out = hmp(q, "xp /100000000xg 0")
    assert len(out) < 10 << 20 and out.endswith("sevmon: output truncated: one command may print at most 8 MiB\r\n")
    out = hmp(q, "x /100000000xb 0")  # paging off: virtual == physical
    assert out.endswith("MiB\r\n")
    rss_kib = int(next(ln for ln in open(f"/proc/{d.proc.pid}/status") if ln.startswith("VmRSS")).split()[1])
    assert rss_kib < 600 * 1024
    assert hmp(q, "info status") == "VM status: paused\r\n"
    q.close()


def test_memsave_beyond_the_mapped_range_and_failed_dumps(make_daemon, tmp_path):
    d = make_daemon("--no-workload", hmp=False)
    q = qmp_connect(d)
    f = tmp_path / "m.bin"
    r = q.cmd_obj({"execute": "memsave", "arguments": {"val": 0x400000, "size": 64 << 20, "filename": str(f)}})
    assert r["error"]["desc"] == f"Invalid addr 0x{0x400000:016x}/size {64 << 20} specified"
    r = q.cmd_obj({"execute": "dump-guest-memory", "arguments": {"paging": False, "protocol": "file:/dev/full"}})
    assert r["error"]["desc"] == "dump: failed to save memory: No space left on device"
    r = q.cmd_obj({"execute": "dump-guest-memory",
                   "arguments": {"paging": False, "protocol": "file:/nonexistent-dir/d.elf"}})
    assert r["error"]["desc"] == "Could not open '/nonexistent-dir/d.elf': No such file or directory"
    assert q.cmd("query-dump")["status"] == "failed"
    assert "running" == q.cmd("query-status")["status"]  # the failed dump resumed the guest
    q.close()


def test_sigterm_while_a_dump_runs(make_daemon, tmp_path):
    raw = tmp_path / "ram.bin"
    raw.write_bytes(os.urandom(256 << 20))
    cpu = tmp_path / "cpu.json"
    cpu.write_text(json.dumps({"cr0": "0x11"}))
    d = make_daemon("--raw", str(raw), "--cpu-state", str(cpu), "--sev")
    q = qmp_connect(d)
    out = tmp_path / "dump.elf"
    q.cmd("dump-guest-memory", paging=False, protocol=f"file:{out}", detach=True)
    assert q.cmd("query-dump")["status"] == "active"
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    assert not os.path.exists(d.qmp) and not os.path.exists(d.hmp)
    assert not out.exists()  # the partial dump was removed
    raw.unlink()


@pytest.mark.parametrize("refusal", [["--policy", "0x1"], ["--debug-policy", "off"]])
def test_no_plaintext_leaves_from_any_entry_point(make_daemon, tmp_path, refusal):
    d = make_daemon("--no-workload", *refusal)
    q = qmp_connect(d)
    outputs = []
    for line in ("info mem", "info tlb", "gva2gpa 0x400000", "x /64xb 0x400000", "x /512c 0x400000",
                 "xp /64xb 0x0", "info registers", "info sev"):
        outputs.append(hmp(q, line))
    for gpa in range(0, 256 << 20, 16 << 20):  # every 16 MiB of RAM, physically
        outputs.append(hmp(q, f"xp /16xg {gpa:#x}"))
    qmp_calls = {"memsave": {"val": 0x400000, "size": 4096}, "pmemsave": {"val": 0, "size": 256 << 20},
                 "dump-guest-memory": {"paging": False}}
    for cmd, args in qmp_calls.items():
        path = tmp_path / f"{cmd}.qmp"
        target = {"protocol": f"file:{path}"} if cmd == "dump-guest-memory" else {"filename": str(path)}
        outputs.append(json.dumps(q.cmd_obj({"execute": cmd, "arguments": {**args, **target}})))
    outputs.append(hmp(q, f"memsave 0x400000 4096 {tmp_path / 'memsave.hmp'}"))
    outputs.append(hmp(q, f"pmemsave 0 {256 << 20} {tmp_path / 'pmemsave.hmp'}"))
    outputs.append(hmp(q, f"dump-guest-memory {tmp_path / 'dump.hmp'}"))
    files = [p.read_bytes() for p in tmp_path.iterdir() if p.suffix in (".qmp", ".hmp")]
    everything = "\n".join(outputs).encode() + b"".join(files)
    for plaintext in (b"user page", b"kernel text", b"stack page", b"vmalloc page", b"7573657220706167"):
        assert plaintext not in everything
    assert q.cmd("query-sev-debug-stats")["bytes-decrypted"] == 0
    assert "policy" in outputs[0]
    q.close()
