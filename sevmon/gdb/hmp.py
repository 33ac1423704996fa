"""HMP ``gdbserver [device]``: start, move or stop the stub at run time, with QEMU's words."""

from __future__ import annotations

import concurrent.futures

from sevmon.gdb.server import DEFAULT_DEVICE, DeviceError, GdbServer
from sevmon.hmp.table import HmpCommand


def install(monitor, server: GdbServer) -> None:
    """Add the command to ``monitor``'s table (the daemon does this once it has a stub)."""

    def gdbserver(ctx, device=None):
        device = device or DEFAULT_DEVICE
        try:
            server.start_from_machine_thread(device)
        except (DeviceError, concurrent.futures.TimeoutError):
            ctx.print(f"Could not open gdbserver on device '{device}'")
            return
        if device == "none":
            ctx.print("Disabled gdbserver")
        else:
            ctx.print(f"Waiting for gdb connection on device '{device}'")

    monitor.table.add(HmpCommand("gdbserver", "device:s?", "[device]",
                                 "start gdbserver on given device (default 'tcp::1234'), stop with 'none'",
                                 gdbserver))
