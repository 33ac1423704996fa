#!/usr/bin/env python3
"""Print what the monitor knows about an SEV guest: its SEV state, its memory map, and
how much debug access has cost so far.

    usage: python3 inspect_guest.py QMP_SOCKET

Works against ``sevmon serve`` (or a QEMU started with ``-qmp unix:PATH,server``).
Needs only the ``qemu.qmp`` package (``pip install qemu.qmp``).
"""

import asyncio
import sys

from qemu.qmp import ConnectError, ExecuteError, QMPClient


async def inspect(socket_path: str) -> None:
    qmp = QMPClient("inspect-guest")
    await qmp.connect(socket_path)  # reads the greeting and negotiates capabilities
    try:
        # 1. SEV state: a QMP query returns a dict.
        sev = await qmp.execute("query-sev")
        print("SEV")
        for key, value in sev.items():
            if key == "policy":
                value = f"{value:#06x}"  # the policy is a bit field: show it in hex
            print(f"  {key:<12} {value}")

        # 2. HMP commands run through QMP with human-monitor-command; the reply is the
        #    text QEMU's monitor would print (lines end in \r\n).
        mem = await qmp.execute("human-monitor-command", {"command-line": "info mem"})
        print("\nVirtual memory (info mem: start-end size protection)")
        for line in mem.splitlines():
            print("  " + line)

        # 3. What reading encrypted memory for the monitor cost: each round trip is one
        #    KVM_SEV_DBG_DECRYPT ioctl; the page cache saves the rest.
        stats = await qmp.execute("query-sev-debug-stats")
        print("\nDebug access")
        for key, value in stats.items():
            print(f"  {key:<16} {value}")
    finally:
        await qmp.disconnect()


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        asyncio.run(inspect(sys.argv[1]))
    except ConnectError as e:
        print(f"inspect_guest: cannot connect to {sys.argv[1]}: {e.exc}", file=sys.stderr)
        return 1
    except ExecuteError as e:  # the monitor answered with an error (e.g. not an SEV guest)
        print(f"inspect_guest: {e.error_class}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
