"""``sevmon bench``: what sevmon exists for, measured side by side in one run.

Round trips and firmware calls are deterministic counts from the kernel transport;
wall times are medians of ``--repeat`` runs and only meaningful as ratios within one run.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from sevmon.bench.readers import make_reader
from sevmon.debug.refusal import cbit_mask
from sevmon.machine.kernel_root import walk_cpu
from sevmon.memory.ram import PAGE_SHIFT
from sevmon.x86 import paging, sev_memory_map
from sevmon.x86.vmcoreinfo import KernelCache

PMEMSAVE_SIZE = 64 << 20
CHUNK = 1 << 20


def _consume(blocks) -> int:
    """The lines of a walk's text blocks (``info_tlb_text``/``info_mem_text``: what the monitor prints)."""
    return sum(block.count("\n") for block in blocks)


def _pmemsave(reader, ram) -> None:
    """The pmemsave loop over the first 64 MiB of the guest's RAM that exists."""
    first = next(iter(ram.frames()), 0) << PAGE_SHIFT
    for off in range(0, PMEMSAVE_SIZE, CHUNK):
        gpa = first + off
        pfns = [p for p in range(gpa >> PAGE_SHIFT, (gpa + CHUNK) >> PAGE_SHIFT) if ram.has(p)]
        if pfns:
            reader.read_frames(pfns, fill=False) if hasattr(reader, "cache") else \
                [reader.read(p << PAGE_SHIFT, 1024) for p in pfns for _ in range(4)]


def _workloads(machine, cpu):
    mask = cbit_mask(machine)
    return {
        "info tlb": lambda mem: _consume(paging.info_tlb_text(mem, cpu, mask)),
        "info mem": lambda mem: _consume(paging.info_mem_text(mem, cpu, mask)),
        "info sev-mem": lambda mem: sev_memory_map.build_map(mem, [cpu], 0, mask),
        "pmemsave 64MiB": lambda mem: _pmemsave(mem, machine.ram),
    }


def _measure(machine, cpu, kind: str, fn, repeat: int) -> dict:
    ops = machine.memory.ops
    reader = make_reader(kind, machine.ram, ops, entry_size=8 if cpu.paging_mode() != "32" else 4)
    out = {}
    for phase in ("cold", "warm"):
        times = []
        for r in range(repeat if kind != "naive" else 1):
            if phase == "cold":
                reader.invalidate()
            before = dict(ops.stats())
            cb = (reader.cache.hits, reader.cache.misses) if hasattr(reader, "cache") else (0, 0)
            t0 = time.perf_counter()
            fn(reader)
            times.append((time.perf_counter() - t0) * 1000)
            after = ops.stats()
            ca = (reader.cache.hits, reader.cache.misses) if hasattr(reader, "cache") else (0, 0)
            if r == 0:
                out[phase] = {k: after[k] - before[k] for k in ("round-trips", "firmware-calls", "bytes-decrypted")}
                out[phase].update({"cache-hits": ca[0] - cb[0], "cache-misses": ca[1] - cb[1]})
        out[phase]["wall-ms"] = round(statistics.median(times), 3)
    return out


def _side_by_side(machine, repeat: int) -> dict:
    report = {}
    # a guest without readable registers (a raw image without --cpu-state) is walked from its kernel's root
    cpu = walk_cpu(machine, machine.cpus[0])
    machine.memory.invalidate()
    for name, fn in _workloads(machine, cpu).items():
        built = _measure(machine, cpu, "sevmon", fn, repeat)
        per_page = _measure(machine, cpu, "per-page", fn, repeat)
        naive = _measure(machine, cpu, "naive", fn, 1)
        for phase in ("cold", "warm"):
            built[phase]["per-page-round-trips"] = per_page[phase]["round-trips"]
            built[phase]["per-page-wall-ms"] = per_page[phase]["wall-ms"]
            built[phase]["naive-round-trips"] = naive["cold"]["round-trips"]
            built[phase]["naive-wall-ms"] = naive["cold"]["wall-ms"]
        report[name] = built
    pages, runs = paging.count_table_reads(make_reader("sevmon", machine.ram, machine.memory.ops),
                                           cpu, cbit_mask(machine))
    report["level-batched lower bound"] = {"table-pages": pages, "round-trips": runs,
                                           "achieved-round-trips": report["info tlb"]["cold"]["round-trips"]}
    report["find guest kernel"] = find_kernel_cost(machine)
    return report


def find_kernel_cost(machine) -> dict:
    """What finding the guest's Linux kernel (its VMCOREINFO page, the walk root of a guest without readable
    registers) costs: cold (a scan from address 0 up, batched), warm (the cached answer checked against its page,
    still cached), and the same scan through a per-page reader (one request per page)."""
    out: dict = {}
    runs = list(machine.ram.runs())
    for kind in ("sevmon", "per-page"):
        ops = machine.memory.ops
        reader = make_reader(kind, machine.ram, ops)
        cache = KernelCache()
        for phase in ("cold", "warm") if kind == "sevmon" else ("cold",):
            before = dict(ops.stats())
            t0 = time.perf_counter()
            kernel = cache.get(reader, runs)
            ms = (time.perf_counter() - t0) * 1000
            after = ops.stats()
            row = {k: after[k] - before[k] for k in ("round-trips", "firmware-calls", "bytes-decrypted")}
            row["wall-ms"] = round(ms, 3)
            if kind == "sevmon":
                out[phase] = row
            else:
                out["per-page-cold"] = row
    out["found"] = kernel is not None
    if kernel is not None:
        out.update({"release": kernel.release, "vmcoreinfo-gpa": kernel.gpa,
                    "ram-pages": sum(n for _, n in runs), "scanned-pages": cache.last_cost.pages})
    return out


# -- scale ---------------------------------------------------------------------------------------
def scale_child(n: int) -> dict:
    """Runs in a fresh process so peak RSS belongs to this size alone."""
    from sevmon.bench.scale import build_scale_guest, make_scale_ram
    from sevmon.debug.access import DebugMemory
    from sevmon.debug.ops import SevOps
    from sevmon.machine.launch import open_sev
    from sevmon.machine.spec import SevSpec

    ram = make_scale_ram()
    sev = open_sev(ram, SevSpec(policy=0))
    sev.launch([(0, bytes(4096))])
    sev.finish()
    t0 = time.perf_counter()
    cpu = build_scale_guest(n, sev.guest_write, sev.me_mask)
    build_s = time.perf_counter() - t0
    mem = DebugMemory(ram, SevOps(ram, sev), cache_pages=1 << 20)
    t0 = time.perf_counter()
    lines_mem = _consume(paging.info_mem_text(mem, cpu, sev.me_mask))
    mem_s = time.perf_counter() - t0
    mem.invalidate()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w") as f:
        lines_tlb = 0
        for block in paging.info_tlb_text(mem, cpu, sev.me_mask):
            f.write(block)
            lines_tlb += block.count("\n")
    tlb_s = time.perf_counter() - t0
    assert lines_tlb == n
    return {"pages": n, "build-s": round(build_s, 3), "info mem cold-s": round(mem_s, 3),
            "info tlb to file cold-s": round(tlb_s, 3), "info mem lines": lines_mem,
            "peak-rss-mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "round-trips": sev.stats.round_trips}


def _scale(n: int) -> dict:
    rows = []
    for size in (max(1, n // 10), n):
        out = subprocess.run([sys.executable, "-c", f"import json,sevmon.bench.run as r; "
                              f"print(json.dumps(r.scale_child({size})))"], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(out.stderr.strip().splitlines()[-1])
        rows.append(json.loads(out.stdout))
    small, big = rows
    growth = {k: round(big[k] / small[k], 2) for k in ("info mem cold-s", "info tlb to file cold-s") if small[k]}
    return {"sizes": rows, "growth x10 pages": growth,
            "goal": "1,000,000 mappings: info mem in at most 1.0 s, peak RSS at most 64 MiB"}


# -- latency ---------------------------------------------------------------------------------------
def _latency(guest_argv: list[str]) -> dict:
    import asyncio

    from qemu.qmp import QMPClient

    tmp = tempfile.mkdtemp(prefix="sevmon-bench-")
    sock = os.path.join(tmp, "qmp.sock")
    proc = subprocess.Popen([sys.executable, "-m", "sevmon", "serve", "--qmp", sock, *guest_argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):
            if os.path.exists(sock):
                break
            time.sleep(0.05)

        async def client(cmd, n, lat):
            c = QMPClient("bench")
            await c.connect(sock)
            for _ in range(n):
                t0 = time.perf_counter()
                if cmd == "query-status":
                    await c.execute("query-status")
                else:
                    await c.execute("human-monitor-command", {"command-line": cmd})
                lat.append((time.perf_counter() - t0) * 1000)
            await c.disconnect()

        async def run(cmd, clients, n):
            lat: list[float] = []
            await asyncio.gather(*(client(cmd, n, lat) for _ in range(clients)))
            lat.sort()
            return {"p50-ms": round(lat[len(lat) // 2], 3), "p99-ms": round(lat[int(len(lat) * 0.99) - 1], 3)}

        async def mixed():
            """query-status latency while 31 other clients keep the machine thread busy."""
            lat: list[float] = []
            busy: list[float] = []
            await asyncio.gather(client("query-status", 100, lat), *(client("info mem", 20, busy) for _ in range(31)))
            lat.sort()
            return {"p50-ms": round(lat[len(lat) // 2], 3), "p99-ms": round(lat[int(len(lat) * 0.99) - 1], 3)}

        out = {}
        for cmd in ("query-status", "info mem"):
            for clients in (1, 32):
                out[f"{cmd} x{clients}"] = asyncio.run(run(cmd, clients, 200 if clients == 1 else 20))
        out["query-status x1 + info mem x31"] = asyncio.run(mixed())
        return out
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


def _vs_qemu(kernel: str, initrd: str, cpu_model: str = "max,la57=off") -> dict:
    if shutil.which("qemu-system-x86_64") is None:
        return {"skipped": "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"}
    from sevmon.bench.vs_qemu import compare
    return compare(kernel, initrd, cpu_model)


def _drgn(args, machine) -> dict:
    """The drgn row on the bench's guest (--core/--raw), or on the --vs-qemu kernel booted and dumped by QEMU."""
    from sevmon.bench.drgn_row import capture, drgn_row
    if args.core or args.raw:
        return drgn_row(machine, _guest_argv(args), args.drgn)
    if shutil.which("qemu-system-x86_64") is None:
        return {"skipped": "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"}
    from sevmon.machine.builder import build_machine
    from sevmon.machine.spec import GuestSpec
    tmp = tempfile.mkdtemp(prefix="sevmon-bench-drgn-")
    try:
        dump = capture(*args.vs_qemu, tmp, args.qemu_cpu)
        captured = build_machine(GuestSpec(source="core", image=dump, workload=False))  # SEV: the default SevSpec
        captured.stop()
        return drgn_row(captured, ["--core", dump, "--sev", "--no-workload"], args.drgn)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _guest_argv(args) -> list[str]:
    argv = []
    if args.core:
        argv += ["--core", args.core]
    if args.raw:
        argv += ["--raw", args.raw]
    if args.cpu_state:
        argv += ["--cpu-state", args.cpu_state]
    argv += ["--sev" if args.sev else "--no-sev", "--policy", hex(args.policy), "--paging", args.paging,
             "--no-workload"]
    if args.cbitpos is not None:
        argv += ["--cbitpos", str(args.cbitpos)]
    if args.kvm:  # the latency daemon runs on the same kernel transport as the bench itself
        argv.append("--kvm")
    return argv


def run_bench(args, spec) -> int:
    """``sevmon bench``: ``spec`` is the guest (SEV, no workload); ``args`` the bench's own options."""
    from sevmon.machine.builder import GuestError, build_machine

    if args.scale_only:  # the generated guests alone (each in a fresh process): seconds, not minutes
        report = {"scale": _scale(args.scale or 1_000_000)}
        print(json.dumps(report, indent=1))
        return 0
    if args.vs_qemu and args.attach:  # a live QEMU, not sevmon's own guest: that comparison alone
        from sevmon.bench.vs_qemu_attach import compare_attached
        report = {"vs-qemu-attach": compare_attached(*args.vs_qemu, args.qemu_cpu, "4G", args.repeat)}
        print(json.dumps(report, indent=1))
        return 0

    try:
        machine = build_machine(spec)
    except GuestError as e:
        print(f"sevmon bench: {e}", file=sys.stderr)
        return 1
    machine.stop()  # a paused guest: warm runs keep their cache
    report = _side_by_side(machine, args.repeat)
    from sevmon.bench.gdb_session import gdb_session
    report["gdb session"] = (gdb_session(machine) if machine.cpus[0].unavailable is None else
                             {"skipped": "gdb reads registers, and this guest's are not available"})
    if getattr(args, "drgn", None):
        report["drgn"] = _drgn(args, machine)
    report["latency"] = _latency(_guest_argv(args))
    if args.scale:
        report["scale"] = _scale(args.scale)
    if args.vs_qemu:
        report["vs-qemu"] = _vs_qemu(*args.vs_qemu, args.qemu_cpu)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        _print_table(report)
    return 0


#: the table's columns: report key -> short header (the legend under the table says what each is), so a row
#: fits in 120 columns
_COLUMNS = {"round-trips": "trips", "firmware-calls": "fw-calls", "bytes-decrypted": "decrypted",
            "cache-hits": "hits", "cache-misses": "misses", "wall-ms": "ms", "per-page-round-trips": "page-trips",
            "naive-round-trips": "naive-trips", "naive-wall-ms": "naive-ms"}
_LEGEND = ("trips: kernel round trips; fw-calls: firmware calls; decrypted: bytes decrypted; hits, misses: page "
           "cache;\nms: median wall time; page-trips: round trips of a per-page cache without batching; naive-trips, "
           "naive-ms:\none DBG_DECRYPT per table entry, no cache")


def _print_table(report: dict) -> None:
    names = ("info tlb", "info mem", "info sev-mem", "pmemsave 64MiB")
    rows = [(name, phase, report[name][phase]) for name in names for phase in ("cold", "warm")]
    width = {k: max(len(h), *(len(str(r.get(k, ""))) for _n, _p, r in rows)) for k, h in _COLUMNS.items()}
    print(f"{'command':14} {'phase':5} " + " ".join(f"{h:>{width[k]}}" for k, h in _COLUMNS.items()))
    for name, phase, row in rows:
        print(f"{name:14} {phase:5} " + " ".join(f"{row.get(k, ''):>{width[k]}}" for k in _COLUMNS))
    print(_LEGEND)
    fk = report["find guest kernel"]
    if fk["found"]:
        print(f"\nfinding the guest kernel (VMCOREINFO at 0x{fk['vmcoreinfo-gpa']:x}, {fk['release']}; "
              f"{fk['scanned-pages']} of {fk['ram-pages']} RAM pages scanned):")
    else:
        print(f"\nfinding the guest kernel: no Linux found ({fk['cold']['firmware-calls']} firmware calls)")
    for name, r in (("cold", fk["cold"]), ("warm", fk["warm"]), ("per-page cold", fk["per-page-cold"])):
        print(f"  {name:14} round trips {r['round-trips']:>8}  firmware calls {r['firmware-calls']:>8}  "
              f"{r['wall-ms']:>9} ms")
    lb = report["level-batched lower bound"]
    print(f"\nlevel-batched lower bound for this guest: {lb['round-trips']} round trips over {lb['table-pages']} "
          f"table pages; sevmon achieved {lb['achieved-round-trips']}")
    _print_gdb(report["gdb session"])
    if "drgn" in report:
        from sevmon.bench.drgn_row import print_drgn_row
        print_drgn_row(report["drgn"])
    print("\nlatency under load:")
    for k, v in report["latency"].items():
        print(f"  {k:22} p50 {v['p50-ms']:8} ms   p99 {v['p99-ms']:8} ms")
    for key in ("scale", "vs-qemu", "vs-qemu-attach"):
        if key in report:
            print(f"\n{key}: {json.dumps(report[key], indent=1)}")


def _print_gdb(row: dict) -> None:
    if "skipped" in row:
        print(f"\ngdb session: skipped ({row['skipped']})")
        return
    print(f"\ngdb session through the stub ({row['script']}):")
    for name, r in (("sevmon cold", row["cold"]), ("sevmon warm", row["warm"]), ("naive stub", row["naive"])):
        print(f"  {name:12} round trips {r['round-trips']:>8}  firmware calls {r['firmware-calls']:>8}  "
              f"bytes decrypted {r['bytes-decrypted']:>10}  {r['wall-ms']:>9} ms")
    print(f"  naive/sevmon, cold: {row['naive/sevmon round trips (cold)']}x the round trips, "
          f"{row['naive/sevmon time (cold)']}x the time")
