#!/usr/bin/env python3
"""Print QMP events (STOP, RESUME, RESET, SHUTDOWN, DUMP_COMPLETED, ...) as they arrive.

    usage: python3 watch_events.py QMP_SOCKET [SECONDS]

Stops after SECONDS (default 10) or when the guest shuts down (SHUTDOWN event).
"""

import asyncio
import json
import sys
import time

from qemu.qmp import QMPClient


async def watch(socket_path: str, seconds: float) -> None:
    qmp = QMPClient("watch-events")
    await qmp.connect(socket_path)
    print(f"watching {socket_path} for {seconds:g} s", flush=True)
    try:
        # qmp.events is the client's default event listener: an async iterator of every
        # event the server sends. asyncio.timeout() ends the loop when time is up.
        async with asyncio.timeout(seconds):
            async for event in qmp.events:
                stamp = event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6
                when = time.strftime("%H:%M:%S", time.localtime(stamp))
                data = json.dumps(event.get("data", {}))
                print(f"{when} {event['event']} {data}", flush=True)
                if event["event"] == "SHUTDOWN":
                    break
    except TimeoutError:
        print("time is up", flush=True)
    finally:
        await qmp.disconnect()


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    seconds = float(sys.argv[2]) if len(sys.argv) == 3 else 10.0
    asyncio.run(watch(sys.argv[1], seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
