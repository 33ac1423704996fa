#!/usr/bin/env python3
"""Dump a guest's memory to an ELF core, open the core in a second monitor, and check that
both monitors see the same virtual memory map (``info mem``).

    usage: python3 dump_and_reopen.py QMP_SOCKET CORE_FILE

The core is what QEMU's ``dump-guest-memory`` writes (paging off: guest-physical memory
plus one register note per vCPU), so crash(8), gdb or ``sevmon serve --core`` can read it
later. Exit status 0 if the two ``info mem`` agree, 1 if not.
"""

import asyncio
import difflib
import json
import os
import re
import subprocess
import sys
import tempfile

from qemu.qmp import ConnectError, ExecuteError, QMPClient


async def hmp(qmp: QMPClient, line: str) -> str:
    """Run one HMP command line through QMP and return its text."""
    return await qmp.execute("human-monitor-command", {"command-line": line})


async def dump(socket_path: str, core: str, workdir: str) -> tuple[str, list[str]]:
    """Dump the guest; return its ``info mem`` and the options to reopen the core with."""
    qmp = QMPClient("dump-and-reopen")
    await qmp.connect(socket_path)
    try:
        # Pause the guest so its page tables cannot change between info mem and the dump.
        was_running = (await qmp.execute("query-status"))["running"]
        await qmp.execute("stop")
        before = await hmp(qmp, "info mem")
        await qmp.execute("dump-guest-memory", {"paging": False, "protocol": "file:" + os.path.abspath(core)})

        options = []
        # EFER (long mode, NX enable) is not in the core's notes: pass it in a cpu.json.
        regs = await hmp(qmp, "info registers")
        efer = re.search(r"EFER=([0-9a-fA-F]+)", regs)
        if efer:
            cpu_json = os.path.join(workdir, "cpu.json")
            with open(cpu_json, "w") as f:
                json.dump({"efer": "0x" + efer.group(1)}, f)
            options += ["--cpu-state", cpu_json]
        # An SEV guest's page-table entries carry the C-bit: reopen it as an SEV guest too.
        if (await qmp.execute("query-sev"))["enabled"]:
            options.append("--sev")
            try:
                caps = await qmp.execute("query-sev-capabilities")
                options += ["--cbitpos", str(caps["cbitpos"])]
            except ExecuteError:
                pass  # not available: the default C-bit position (47) is used
        else:
            options.append("--no-sev")
        if was_running:
            await qmp.execute("cont")
    finally:
        await qmp.disconnect()
    return before, options


async def info_mem_of_core(core: str, options: list[str], workdir: str) -> str:
    """Start ``sevmon serve --core CORE`` on a socket of its own and ask it for info mem."""
    sock = os.path.join(workdir, "core-qmp.sock")
    daemon = subprocess.Popen([sys.executable, "-m", "sevmon", "serve", "--qmp", sock, "--core", core, *options])
    try:
        qmp = QMPClient("reopened-core")
        for _ in range(300):  # wait up to 30 s for the daemon to listen
            try:
                await qmp.connect(sock)
                break
            except ConnectError:
                if daemon.poll() is not None:
                    raise SystemExit(f"sevmon serve --core {core} exited with status {daemon.returncode}") from None
                await asyncio.sleep(0.1)
        else:
            raise SystemExit("sevmon serve --core did not start")
        try:
            return await hmp(qmp, "info mem")
        finally:
            await qmp.disconnect()
    finally:
        daemon.terminate()
        daemon.wait()


async def run(socket_path: str, core: str) -> int:
    with tempfile.TemporaryDirectory() as workdir:
        before, options = await dump(socket_path, core, workdir)
        print(f"dumped to {core} ({os.path.getsize(core)} bytes); reopening with {' '.join(options) or 'no options'}")
        after = await info_mem_of_core(core, options, workdir)
    if before == after:
        print(f"SAME: info mem agrees ({len(before.splitlines())} lines)")
        return 0
    print("DIFFERENT: info mem of the live guest (-) and of the core (+):")
    sys.stdout.writelines(difflib.unified_diff(before.splitlines(True), after.splitlines(True), "live", "core"))
    return 1


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return asyncio.run(run(sys.argv[1], sys.argv[2]))


if __name__ == "__main__":
    sys.exit(main())
