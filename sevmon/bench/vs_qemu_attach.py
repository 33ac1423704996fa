"""``sevmon bench --vs-qemu KERNEL INITRD --attach``: sevmon attached to a live QEMU
against QEMU's own monitor, on the same paused guest, side by side in one run.

QEMU (TCG) boots the Linux with its RAM in a shared memfd and two QMP monitors; sevmon
attaches to one, the bench talks to QEMU's own on the other. Each round lets the guest
run a moment and pauses it (so sevmon's page cache is cold), then times sevmon's first
``info tlb``/``info mem`` (cold), QEMU's, and sevmon's again (warm), all end to end over
QMP, and checks the outputs are equal. There is no SEV and no simulation on this path:
the page-table walk (and the register fetch from QEMU) is the whole cost.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from qemu.qmp import QMPClient

from sevmon.bench.vs_qemu import BOOT_SECONDS, _hmp, _wait_socket

READY_MARKER = "SEVMON-GUEST-READY"  # tests/live/build_guest.py's init prints it


async def _timed(client: QMPClient, line: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    out = await _hmp(client, line)
    return out, (time.perf_counter() - t0) * 1000


async def _boot(qemu: subprocess.Popen, serial: str, sock: str) -> None:
    await _wait_socket(sock, qemu)
    deadline = time.monotonic() + BOOT_SECONDS
    while time.monotonic() < deadline:
        if os.path.exists(serial) and READY_MARKER in open(serial, errors="replace").read():
            await asyncio.sleep(1)  # the guest's processes start
            return
        await asyncio.sleep(0.2)


async def _compare(kernel: str, initrd: str, tmp: str, cpu_model: str, mem: str, rounds: int) -> dict:
    a, b, serial = (os.path.join(tmp, n) for n in ("a.sock", "b.sock", "serial.log"))
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "pc,memory-backend=ram0", "-accel", "tcg", "-cpu", cpu_model,
         "-m", mem, "-object", f"memory-backend-memfd,id=ram0,size={mem},share=on", "-nodefaults",
         "-display", "none", "-serial", f"file:{serial}", "-no-reboot", "-kernel", kernel, "-initrd", initrd,
         "-append", "console=ttyS0 panic=-1 quiet", "-qmp", f"unix:{a},server=on,wait=off",
         "-qmp", f"unix:{b},server=on,wait=off"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    sev = None
    try:
        await _boot(qemu, serial, b)
        ssock = os.path.join(tmp, "sevmon.sock")
        sev = subprocess.Popen([sys.executable, "-m", "sevmon", "serve", "--attach", a, "--qmp", ssock],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        await _wait_socket(ssock, sev)
        theirs, ours = QMPClient("bench-qemu"), QMPClient("bench-sevmon")
        await theirs.connect(b)
        await ours.connect(ssock)
        version = await theirs.execute("query-version")
        ms: dict[str, list[float]] = {k: [] for k in (
            "qemu info tlb", "qemu info mem", "sevmon info tlb cold", "sevmon info tlb warm",
            "sevmon info mem cold", "sevmon info mem warm")}
        equal = {"info tlb": True, "info mem": True}
        lines = {}
        for _ in range(rounds):
            for cmd in ("info tlb", "info mem"):
                await theirs.execute("cont")
                await asyncio.sleep(0.3)
                await theirs.execute("stop")
                cold, t_cold = await _timed(ours, cmd)
                q, t_q = await _timed(theirs, cmd)
                warm, t_warm = await _timed(ours, cmd)
                ms[f"sevmon {cmd} cold"].append(t_cold)
                ms[f"qemu {cmd}"].append(t_q)
                ms[f"sevmon {cmd} warm"].append(t_warm)
                equal[cmd] = equal[cmd] and cold == q == warm
                lines[cmd] = q.count("\n")
        regs = await _hmp(theirs, "info registers")
        await ours.disconnect()
        await theirs.disconnect()
    finally:
        if sev is not None:
            sev.terminate()
            sev.wait(10)
        qemu.terminate()
        qemu.wait(10)
    med = {k: statistics.median(v) for k, v in ms.items()}
    la57 = "CR4=" in regs and int(regs.split("CR4=")[1][:8], 16) & (1 << 12)
    return {
        "qemu": f"{version['qemu']['major']}.{version['qemu']['minor']}.{version['qemu']['micro']} "
                f"{version['package']}",
        "paging": "5-level" if la57 else "4-level", "guest RAM": mem, "rounds": rounds,
        "info tlb lines": lines.get("info tlb"), "info mem lines": lines.get("info mem"),
        "outputs equal": equal,
        "median-ms": {k: round(v, 2) for k, v in med.items()},
        "ratio sevmon/qemu": {
            f"{cmd} {phase}": round(med[f"sevmon {cmd} {phase}"] / med[f"qemu {cmd}"], 2)
            for cmd in ("info tlb", "info mem") for phase in ("cold", "warm")},
    }


def compare_attached(kernel: str, initrd: str, cpu_model: str = "max,la57=off", mem: str = "4G",
                     rounds: int = 5) -> dict:
    if shutil.which("qemu-system-x86_64") is None:
        return {"skipped": "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)"}
    tmp = tempfile.mkdtemp(prefix="sevmon-vs-qemu-attach-")
    try:
        return asyncio.run(_compare(kernel, initrd, tmp, cpu_model, mem, rounds))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
