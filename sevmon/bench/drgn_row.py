"""``sevmon bench --drgn VMLINUX``: what drgn's task list and dmesg cost on a captured Linux guest, side by side.

- ``sevmon``: ``sevmon.drgn.program`` against a daemon serving the same guest, as ``sevmon drgn`` runs (the
  client's page cache, QMP ``read-guest-physical``, the daemon's page cache). Cold: both caches empty; warm: the
  client's dropped (a new ``sevmon drgn`` run), the daemon's kept (the guest stayed paused).
- ``naive``: drgn on the bench's own machine, one DBG_DECRYPT per read drgn makes, nothing cached.

Counts are the kernel transport's (deterministic); distinct pages are the daemon's decrypted bytes / 4 KiB.
Loading the vmlinux (seconds) is not timed; the times are one run each.

The guest is ``--core``/``--raw`` of a captured Linux guest, or, with ``--vs-qemu KERNEL INITRD``, that kernel
booted under QEMU (TCG, 1 GiB), paused and dumped with QEMU's ``dump-guest-memory`` by :func:`capture` (so the
row is one command), opened as an SEV guest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from sevmon.debug.refusal import cbit_mask
from sevmon.drgn.reader import ReadFault
from sevmon.memory.ram import MemoryAccessError

PAGE = 4096
COUNTS = ("round-trips", "firmware-calls", "bytes-decrypted")


def tasks_and_dmesg(prog) -> tuple[int, int]:
    """The workload: every task's pid and comm, every printk record's text."""
    from drgn.helpers.linux.pid import for_each_task
    from drgn.helpers.linux.printk import get_printk_records
    tasks = [(int(t.pid), t.comm.string_()) for t in for_each_task(prog)]
    return len(tasks), len(get_printk_records(prog))


def capture(kernel: str, initrd: str, tmp: str, cpu_model: str = "max,la57=off", mem: str = "1G") -> str:
    """Boot ``kernel`` under QEMU TCG, let it run ``SEVMON_BENCH_BOOT_SECONDS`` (as ``--vs-qemu`` does), pause it
    and write QEMU's own ``dump-guest-memory`` (ELF, paging off); the dump's path."""
    from qemu.qmp.legacy import QEMUMonitorProtocol

    from sevmon.bench.vs_qemu import BOOT_SECONDS
    qsock, dump = os.path.join(tmp, "qemu.sock"), os.path.join(tmp, "guest.elf")
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-cpu", cpu_model, "-m", mem, "-nodefaults",
         "-display", "none", "-serial", "null", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
         "-append", "console=ttyS0 panic=-1 quiet", "-qmp", f"unix:{qsock},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not os.path.exists(qsock):
            if qemu.poll() is not None:
                raise RuntimeError(f"QEMU failed: {qemu.stderr.read().strip()}")
            time.sleep(0.05)
        q = QEMUMonitorProtocol(qsock)
        q.connect(negotiate=True)
        time.sleep(BOOT_SECONDS)
        q.cmd("stop")
        q.cmd("dump-guest-memory", paging=False, protocol=f"file:{dump}")
        q.close()
    finally:
        qemu.terminate()
        qemu.wait(10)
    return dump


def _serve(guest_argv: list[str], tmp: str) -> tuple[subprocess.Popen, str]:
    sock = os.path.join(tmp, "qmp.sock")
    proc = subprocess.Popen([sys.executable, "-m", "sevmon", "serve", "--qmp", sock, *guest_argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not os.path.exists(sock):  # an SEV image is launched (encrypted) before the socket appears
        if proc.poll() is not None:
            raise RuntimeError(f"sevmon serve failed: {proc.stderr.read().strip()}")
        time.sleep(0.1)
    return proc, sock


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in COUNTS}


def drgn_row(machine, guest_argv: list[str], vmlinux: str) -> dict:
    from sevmon.drgn import program
    from sevmon.drgn.qmp_client import QmpClient
    from sevmon.drgn.target import kernel_program

    tmp = tempfile.mkdtemp(prefix="sevmon-bench-drgn-")
    proc, sock = _serve(guest_argv, tmp)
    try:
        prog = program(sock, vmlinux=vmlinux)
        reader = prog.config["sevmon_reader"]
        stats = QmpClient(sock)
        vmcoreinfo = stats.execute("query-guest-kernel")["vmcoreinfo"]
        out: dict = {}
        for phase in ("cold", "warm"):
            reader.drop()
            before, requests, reads = stats.execute("query-sev-debug-stats"), reader.requests, reader.reads
            t0 = time.perf_counter()
            tasks, records = tasks_and_dmesg(prog)
            ms = (time.perf_counter() - t0) * 1000
            row = _delta(before, stats.execute("query-sev-debug-stats"))
            row.update({"pages-decrypted": row["bytes-decrypted"] // PAGE, "qmp-requests": reader.requests - requests,
                        "drgn-reads": reader.reads - reads, "wall-ms": round(ms, 1)})
            out[phase] = row
        stats.close()
        reader.client.close()
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)

    ops, mask = machine.memory.ops, cbit_mask(machine)
    naive_reads = 0

    def naive(address: int, count: int) -> bytes:
        nonlocal naive_reads
        naive_reads += 1
        try:
            return ops.read_run(address & ~mask, count, True)
        except MemoryAccessError as e:
            raise ReadFault(address, e.reason) from None
    nprog = kernel_program(vmcoreinfo, naive, vmlinux)
    naive_reads = 0  # the workload's reads only, not those of loading the debug info
    before = dict(ops.stats())
    t0 = time.perf_counter()
    tasks, records = tasks_and_dmesg(nprog)
    ms = (time.perf_counter() - t0) * 1000
    row = _delta(before, ops.stats())
    row.update({"drgn-reads": naive_reads, "wall-ms": round(ms, 1)})
    out["naive"] = row
    out.update({"tasks": tasks, "printk-records": records})
    return out


def print_drgn_row(row: dict) -> None:
    if "skipped" in row:
        print(f"\ndrgn: skipped ({row['skipped']})")
        return
    print(f"\ndrgn: task list + dmesg ({row['tasks']} tasks, {row['printk-records']} printk records):")
    for name, r in (("sevmon cold", row["cold"]), ("sevmon warm", row["warm"]), ("naive", row["naive"])):
        what = (f"pages {r['pages-decrypted']:>6}  QMP requests {r['qmp-requests']:>6}" if "pages-decrypted" in r
                else f"decrypted {r['bytes-decrypted']:>12} bytes")
        print(f"  {name:11}  trips {r['round-trips']:>6}  fw-calls {r['firmware-calls']:>6}  {what}  "
              f"drgn reads {r['drgn-reads']:>6}  {r['wall-ms']:>8} ms")
    print("  (trips: kernel round trips; pages: distinct pages decrypted; warm: a new client's empty cache, the "
          "daemon's\n  kept; naive: one DBG_DECRYPT per drgn read, nothing cached)")
