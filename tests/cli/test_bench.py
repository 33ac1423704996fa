"""sevmon bench reports deterministic counts side by side (not a timed test: only counts
and shapes are asserted; wall times are reported, never compared)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import FIXTURES


def test_bench_json_on_the_32bit_fixture(capsys):
    fx = FIXTURES / "linux-32bit"
    out = subprocess.run([sys.executable, "-m", "sevmon", "bench", "--json", "--repeat", "1",
                          "--core", str(fx / "core.elf"), "--cpu-state", str(fx / "cpu.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "gdb stub listening" not in out.stderr  # the bench's own stubs are not the user's business
    report = json.loads(out.stdout)
    bound = report["level-batched lower bound"]
    assert bound == {"table-pages": 15, "round-trips": 11, "achieved-round-trips": 11}
    tlb = report["info tlb"]
    assert tlb["cold"]["round-trips"] == 11 and tlb["cold"]["firmware-calls"] == 15
    assert tlb["cold"]["per-page-round-trips"] == 15
    assert tlb["cold"]["naive-round-trips"] == 15 * 1024          # one DBG_DECRYPT per 4-byte entry
    assert tlb["warm"]["round-trips"] == 0 and tlb["warm"]["cache-hits"] == 15
    assert report["info mem"]["cold"]["round-trips"] == 11
    assert report["info sev-mem"]["cold"]["round-trips"] == 11 and report["info sev-mem"]["warm"]["round-trips"] == 0
    assert report["pmemsave 64MiB"]["cold"]["bytes-decrypted"] > 0
    gdb = report["gdb session"]           # x/512gx on 4 pages through the stub, 8 bytes a packet
    assert gdb["packets"] == 512 * gdb["pages"] and gdb["pages"] == 4
    assert gdb["cold"]["round-trips"] <= 2 * gdb["pages"]       # data pages + their tables, once each
    assert gdb["warm"]["round-trips"] == 0
    assert gdb["naive"]["round-trips"] >= 2 * gdb["packets"]     # >= 1 table level + the bytes, per packet
    for key in ("query-status x1", "query-status x32", "info mem x1", "info mem x32"):
        assert report["latency"][key]["p50-ms"] <= report["latency"][key]["p99-ms"]
    # the same report as text fits a 120-column terminal, counts included
    from sevmon.bench.run import _print_table
    _print_table(report)
    text = capsys.readouterr().out
    assert max(map(len, text.splitlines())) <= 120, text
    line = next(ln for ln in text.splitlines() if ln.startswith("info tlb") and "cold" in ln)
    assert line.split()[3:5] == [str(tlb["cold"]["round-trips"]), str(tlb["cold"]["firmware-calls"])]


def test_bench_scale_reports_both_sizes():
    """``--scale-only`` runs the generated guests and nothing else; the goal printed is the issue's."""
    out = subprocess.run([sys.executable, "-m", "sevmon", "bench", "--scale", "20000", "--scale-only"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert list(report) == ["scale"]
    scale = report["scale"]
    assert scale["goal"] == "1,000,000 mappings: info mem in at most 1.0 s, peak RSS at most 64 MiB"
    small, big = scale["sizes"]
    assert (small["pages"], big["pages"]) == (2000, 20000)
    assert big["info mem lines"] == 20000 and big["round-trips"] > small["round-trips"]


def test_bench_vs_qemu_without_qemu_says_so(monkeypatch):
    from sevmon.bench import run
    monkeypatch.setattr(run.shutil, "which", lambda name: None)
    assert "not installed" in run._vs_qemu("k", "i")["skipped"]


def test_bench_reports_what_finding_the_guest_kernel_costs(tmp_path):
    """The built-in SEV guest keeps its VMCOREINFO page at 20 MiB: the batched scan reaches it in a few requests
    (each page one firmware call), the cached answer costs nothing, a per-page reader needs one round trip a page."""
    from sevmon.bench.run import find_kernel_cost
    from sevmon.machine.builder import build_machine
    from sevmon.machine.spec import GuestSpec

    machine = build_machine(GuestSpec(memory_mib=64, workload=False))
    machine.stop()
    row = find_kernel_cost(machine)
    assert row["found"] and row["release"] == "6.1.0-sevmon-builtin" and row["vmcoreinfo-gpa"] == 20 << 20
    cold, warm, per_page = row["cold"], row["warm"], row["per-page-cold"]
    assert 0 < cold["round-trips"] < 64 and cold["firmware-calls"] <= row["scanned-pages"] + 1
    assert warm["round-trips"] == 0 and warm["firmware-calls"] == 0
    assert per_page["round-trips"] >= 1000 > 10 * cold["round-trips"]
    assert row["scanned-pages"] < row["ram-pages"]


def test_bench_drgn_needs_a_captured_linux_guest(tmp_path):
    """The drgn row runs drgn on a Linux guest (--core/--raw): the built-in guest has no kernel drgn can read."""
    out = subprocess.run([sys.executable, "-m", "sevmon", "bench", "--drgn", str(tmp_path / "vmlinux")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines()[-1] == (
        "sevmon bench: error: argument --drgn: needs a Linux guest: a capture (--core FILE or --raw FILE), or "
        "--vs-qemu KERNEL INITRD to boot and dump one")
