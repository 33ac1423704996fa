"""``sevmon serve``: build the machine, listen on the sockets, run until quit or a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from sevmon.commands.registry import build
from sevmon.machine.builder import GuestError, build_machine
from sevmon.machine.runner import MachineRunner
from sevmon.machine.spec import GuestSpec
from sevmon.qmp.server import QMPServer
from sevmon.unixsock import SocketInUse

log = logging.getLogger("sevmon")

GUEST_TICK = 0.05  # seconds between guest time slices while running


async def run_daemon(machine, qmp_paths: list[str], hmp_paths: list[str], *, ready=None,
                     build_commands=build, configure=None, until=None, gdb: str | None = None,
                     on_signal: str = "stopping: clients get SHUTDOWN, the sockets are removed") -> None:
    """``build_commands(runner)`` gives the command set; ``configure(server)`` adjusts the
    QMP server before it listens; ``until`` (an awaitable) also ends the daemon; ``gdb``: a -gdb device;
    ``on_signal``: what the daemon says it does on SIGINT/SIGTERM (a Ctrl-C that prints nothing looks lost)."""
    # The machine thread runs long pure-Python walks; a short GIL switch interval lets the
    # event loop answer state queries and other clients' I/O in between (measured by
    # sevmon bench: query-status p99 under 31 concurrent info mem clients).
    sys.setswitchinterval(0.0005)
    runner = MachineRunner(machine)
    registry, hmp = build_commands(runner)
    server = QMPServer(runner, registry, hmp)
    if configure is not None:
        configure(server)
    hmp_server = None
    paths: list[str] = []
    loop = asyncio.get_running_loop()
    def stop(sig: signal.Signals) -> None:
        log.info("%s: %s", sig.name, on_signal)
        machine.quit("host-signal")

    for sig in (signal.SIGINT, signal.SIGTERM):  # before the sockets exist: a client may signal at once
        loop.add_signal_handler(sig, stop, sig)
    gdb_server = _gdb_stub(runner, hmp)
    from sevmon.commands.migration import start_incoming
    incoming = start_incoming(runner)  # --incoming: bound before the daemon says it is ready
    try:
        if gdb:
            await _start_gdb(gdb_server, gdb)
        for path in qmp_paths:
            await server.listen(path)
            paths.append(path)
        if hmp_paths:
            from sevmon.hmp.server import HMPServer
            hmp_server = HMPServer(runner, hmp)
            for path in hmp_paths:
                await hmp_server.listen(path)
                paths.append(path)
        log.info("listening: QMP on %s%s", ", ".join(qmp_paths),
                 f", HMP on {', '.join(hmp_paths)}" if hmp_paths else "")
        if ready is not None:
            ready()
        ticker = asyncio.create_task(_guest_ticker(runner))
        waits = [asyncio.ensure_future(server.shutdown.wait())]
        if until is not None:
            waits.append(asyncio.ensure_future(until))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        ticker.cancel()
    finally:
        if incoming is not None:
            incoming.close()
        await runner.cancel_jobs()  # SIGTERM mid-dump: the dump stops and removes its partial file
        await gdb_server.close()
        if hmp_server is not None:
            await hmp_server.close()
        await server.close()
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        runner.shutdown()


def _gdb_stub(runner, hmp):
    """The gdb stub (idle until --gdb or HMP gdbserver starts it), wired to HMP."""
    from sevmon.gdb import hmp as gdb_hmp
    from sevmon.gdb.server import GdbServer
    stub = GdbServer(runner, hmp)
    gdb_hmp.install(hmp, stub)
    return stub


async def _start_gdb(stub, device: str) -> None:
    from sevmon.gdb.server import DeviceError
    try:
        await stub.start(device)
    except DeviceError as e:
        raise SocketInUse(f"--gdb {e}") from None


async def _guest_ticker(runner: MachineRunner) -> None:
    """Give a running guest time slices on the machine thread, between commands."""
    while True:
        await asyncio.sleep(GUEST_TICK)
        await runner.guest_slice()


def serve(spec: GuestSpec, qmp: list[str], hmp: list[str], gdb: str | None = None) -> int:
    """``sevmon serve``: build the machine ``spec`` describes and serve it until quit or a signal."""
    try:
        machine = build_machine(spec)
    except GuestError as e:
        log.error("%s", e)
        return 1
    try:
        asyncio.run(run_daemon(machine, qmp, hmp, gdb=gdb))
    except SocketInUse as e:
        log.error("%s", e)
        return 1
    return 0
