"""``sevmon serve``: build the machine, listen on the sockets, run until quit or a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from sevmon.commands import build
from sevmon.machine.builder import GuestError, build_machine
from sevmon.qmp.server import QMPServer
from sevmon.unixsock import SocketInUse

log = logging.getLogger("sevmon")

GUEST_TICK = 0.05  # seconds between guest time slices while running


async def run_daemon(machine, qmp_paths: list[str], hmp_paths: list[str], *, ready=None) -> None:
    # The machine thread runs long pure-Python walks; a short GIL switch interval lets the
    # event loop answer state queries and other clients' I/O in between (measured by
    # sevmon bench: query-status p99 under 31 concurrent info mem clients).
    sys.setswitchinterval(0.0005)
    registry, hmp = build(machine)
    server = QMPServer(machine, registry, hmp)
    hmp_server = None
    paths: list[str] = []
    from sevmon.commands.migration import start_incoming
    incoming = start_incoming(machine)  # --incoming: bound before the daemon says it is ready
    try:
        for path in qmp_paths:
            await server.listen(path)
            paths.append(path)
        if hmp_paths:
            from sevmon.hmp.server import HMPServer
            hmp_server = HMPServer(machine, hmp, server.executor)
            for path in hmp_paths:
                await hmp_server.listen(path)
                paths.append(path)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: machine.quit("host-signal"))
        log.info("listening: QMP on %s%s", ", ".join(qmp_paths),
                 f", HMP on {', '.join(hmp_paths)}" if hmp_paths else "")
        if ready is not None:
            ready()
        ticker = asyncio.create_task(_guest_ticker(machine, server))
        await server.shutdown.wait()
        ticker.cancel()
    finally:
        job = machine.dump
        if job is not None and job.active:  # SIGTERM mid-dump: stop it; it removes its partial file
            job.cancel.set()
            for _ in range(200):
                if not job.active:
                    break
                await asyncio.sleep(0.05)
        if incoming is not None:
            incoming.close()
        job = machine.config.extra.get("migration-job")
        if job is not None and job.active:
            job.cancel.set()
        if hmp_server is not None:
            await hmp_server.close()
        await server.close()
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        server.executor.shutdown(wait=False, cancel_futures=True)


async def _guest_ticker(machine, server) -> None:
    """Give a running guest time slices on the machine thread, between commands."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(GUEST_TICK)
        if machine.running and machine.workload is not None:
            def tick():
                with machine.lock:
                    machine.run_guest()
            await loop.run_in_executor(server.executor, tick)


def serve(args) -> int:
    try:
        machine = build_machine(args)
    except GuestError as e:
        log.error("%s", e)
        return 1
    qmp = args.qmp or ["./sevmon-qmp.sock"]
    try:
        asyncio.run(run_daemon(machine, qmp, args.hmp))
    except SocketInUse as e:
        log.error("%s", e)
        return 1
    return 0
