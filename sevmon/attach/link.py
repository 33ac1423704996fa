"""sevmon's link to QEMU's QMP monitor (qemu.qmp's QMPClient), held for sevmon's lifetime.

QEMU serves one client per monitor: sevmon takes it and serves everyone else. The link
knows QEMU's version (``query-version``: a proxy's greeting may carry its own), QEMU's PID
(SO_PEERCRED of the socket, or given when the socket is a proxy's: libvirt's
``virt-qemu-qmp-proxy``), relays QEMU's events in order, and lets the machine thread make
synchronous calls on the event loop (``call_sync``). Only qemu.qmp's public API is used.

Behind a proxy (``qemu_pid`` given) two things differ from QEMU's own socket: a proxy may
serve one command at a time (libvirt's parses its whole input as one JSON document), so
calls are serialized; and a proxy outlives QEMU, so QEMU's end is seen on its pidfd.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from qemu.qmp import EventListener, QMPClient
from qemu.qmp.message import Message
from qemu.qmp.qmp_client import ExecInterruptedError, ExecuteError

from sevmon.attach.errors import AttachError

log = logging.getLogger("sevmon.attach")

GREETING_TIMEOUT = 5.0
# after QEMU's process ends, how long its last events (SHUTDOWN) may take to come through a proxy
LAST_EVENTS_GRACE = 2.0
# qemu.qmp logs every failure itself; sevmon says each in one sentence of its own
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


def _quits(msg) -> bool:
    """Is ``msg`` QMP's ``quit``, or HMP's ``quit``/``q`` through human-monitor-command?"""
    if msg.get("execute") == "quit" or msg.get("exec-oob") == "quit":
        return True
    if msg.get("execute") != "human-monitor-command":
        return False
    line = (msg.get("arguments") or {}).get("command-line")
    return isinstance(line, str) and line.split()[:1] in (["quit"], ["q"])


class QemuLink:
    def __init__(self, path: str, qemu_pid: int | None = None):
        """``qemu_pid``: QEMU's process when ``path`` is a proxy's socket (its peer is not QEMU)."""
        self.path = path
        self.client = QMPClient("sevmon-attach")
        self.pid: int | None = qemu_pid
        self.proxied = qemu_pid is not None
        self.version: dict | None = None
        self.capabilities: list = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.events = EventListener()
        self.on_event: Callable[[dict], None] | None = None
        self.on_shutdown_seen: Callable[[], bool] = lambda: False
        self.closed = asyncio.Event()   # QEMU closed the monitor (quit) or the socket was lost
        self.detach = asyncio.Event()   # sevmon was told to stop (a signal): QEMU keeps running
        self._pump: asyncio.Task | None = None
        self._loop_thread: int | None = None
        self._serial = asyncio.Lock() if self.proxied else None
        self._pidfd: int | None = None
        self._quits_pending = 0

    # -- connecting ------------------------------------------------------------------
    async def connect(self) -> None:
        """Connect and negotiate, or raise AttachError with one sentence."""
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        if self.proxied:
            try:
                self._pidfd = os.pidfd_open(self.pid)
            except ProcessLookupError:
                raise AttachError(f"no process {self.pid} (--qemu-pid): QEMU is not running there") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except FileNotFoundError:
            sock.close()
            raise AttachError(f"{self.path}: no such socket (start QEMU with -qmp unix:{self.path},"
                              "server=on,wait=off)") from None
        except PermissionError:
            sock.close()
            raise AttachError(f"{self.path}: no permission to connect to QEMU's monitor") from None
        except OSError as e:
            sock.close()
            raise AttachError(f"{self.path}: cannot connect to QEMU's monitor: {e.strerror}") from None
        if self.pid is None:
            pid, _uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            self.pid = pid or None
        self.client.register_listener(self.events)
        try:
            await asyncio.wait_for(self.client.connect(sock), GREETING_TIMEOUT)
        except TimeoutError:
            sock.close()
            raise AttachError(f"{self.path}: no QMP greeting within {GREETING_TIMEOUT:g} s: QEMU serves one "
                              "client per monitor and another client probably holds this one") from None
        except (EOFError, ConnectionError):
            sock.close()
            raise AttachError(f"{self.path}: the monitor closed the connection before any QMP greeting") from None
        except Exception:
            sock.close()
            raise AttachError(f"{self.path}: no QMP greeting: this socket does not speak QMP (QEMU's -qmp, "
                              "not -monitor)") from None
        greeting = self.client.greeting
        self.capabilities = list(greeting.QMP.capabilities) if greeting is not None else []
        # QEMU's greeting carries its version; a proxy's may carry the proxy's (libvirt's says libvirt's)
        self.version = None if self.proxied or greeting is None else dict(greeting.QMP.version)
        if self.version is None:
            self.version = await self.execute("query-version")
        self._pump = asyncio.create_task(self._event_pump())
        if self._pidfd is not None:
            self.loop.add_reader(self._pidfd, self._qemu_exited)

    def _qemu_exited(self) -> None:
        """QEMU's process ended (seen on its pidfd): a proxy may keep its socket open, so the
        link closes here, once QEMU's last events (SHUTDOWN) have come through or after a grace."""
        assert self.loop is not None and self._pidfd is not None
        self.loop.remove_reader(self._pidfd)

        async def close_soon():
            for _ in range(int(LAST_EVENTS_GRACE / 0.05)):
                if self.on_shutdown_seen():
                    break
                await asyncio.sleep(0.05)
            await self._close()
        self._closer = asyncio.ensure_future(close_soon())

    async def _event_pump(self) -> None:
        """Relay QEMU's events until the link closes; then say so (``closed``)."""
        waiter = asyncio.create_task(self.client.runstate_changed())
        try:
            while True:
                get = asyncio.create_task(self.events.get())
                done, _ = await asyncio.wait({get, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    self._deliver(get.result())
                else:
                    get.cancel()
                    if self.client.runstate.name != "RUNNING":
                        self.drain()
                        break
                    waiter = asyncio.create_task(self.client.runstate_changed())
        finally:
            waiter.cancel()
            if self._quits_pending:
                self._closer = asyncio.ensure_future(self._close())
            else:
                self.closed.set()

    async def _close(self) -> None:
        """Say the link is closed, once a quit in flight has been answered (a proxy drops the link before
        QEMU's reply to quit comes through)."""
        while self._quits_pending:
            await asyncio.sleep(0.05)
        self.closed.set()

    def drain(self) -> None:
        """Deliver every event QEMU sent before the reply just received (events and
        replies arrive in order on the one socket; this keeps them in order for sevmon)."""
        for event in self.events.clear():
            self._deliver(event)

    def _deliver(self, event) -> None:
        if self.on_event is not None:
            event = dict(event)
            if isinstance(event.get("data"), str):
                # libvirt 9.0's proxy passes an event's data on as the JSON text libvirt gave it
                with contextlib.suppress(ValueError):
                    event["data"] = json.loads(event["data"])
            self.on_event(event)

    async def disconnect(self) -> None:
        """Release QEMU's monitor; a link QEMU already dropped reports its EOF here, quietly."""
        if self._pump is not None:
            self._pump.cancel()
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        with contextlib.suppress(Exception):
            await self.client.disconnect()

    # -- calls -----------------------------------------------------------------------
    async def _execute_msg(self, msg: Message):
        quits = _quits(msg)
        self._quits_pending += quits  # the link stays open until the quit is answered
        try:
            if self._serial is None:
                return await self.client.execute_msg(msg)
            async with self._serial:
                return await self.client.execute_msg(msg)
        except ExecInterruptedError:
            if quits and await self._qemu_ended():
                return await self._quit_answered(msg)
            raise AttachError(f"lost QEMU's monitor ({self.path}) before its reply to "
                              f"{msg.get('execute') or msg.get('exec-oob')}") from None
        finally:
            self._quits_pending -= quits

    async def _qemu_ended(self, timeout: float = 10.0) -> bool:
        """Did QEMU's process end (within ``timeout``)? Its pidfd turns readable when it does."""
        if self._pidfd is None:
            return False
        for _ in range(int(timeout / 0.05)):
            if select.select([self._pidfd], [], [], 0)[0]:
                return True
            await asyncio.sleep(0.05)
        return False

    async def _quit_answered(self, msg: Message):
        """libvirt's proxy drops its client when QEMU quits, before QEMU's reply comes through (libvirt takes
        it): QEMU did quit, so the client gets what QEMU's own monitor gives: success, and SHUTDOWN with
        QEMU's reason for a monitor's quit, QEMU's own event if it came through, else one of sevmon's."""
        for _ in range(int(LAST_EVENTS_GRACE / 0.05)):
            self.drain()
            if self.on_shutdown_seen():
                break
            await asyncio.sleep(0.05)
        else:
            now = time.time()
            self._deliver({"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-qmp-quit"},
                           "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}})
        return "" if msg.get("execute") == "human-monitor-command" else {}

    async def raw(self, msg: dict) -> dict:
        """Send one QMP command (the link assigns its id) and return QEMU's whole reply, errors included."""
        try:
            return {"return": await self._execute_msg(Message(msg))}
        except ExecuteError as e:
            return dict(e.received)
        except AttachError as e:
            return {"error": {"class": "GenericError", "desc": str(e)}}

    async def execute(self, name: str, arguments: dict | None = None):
        try:
            return await self._execute_msg(QMPClient.make_execute_msg(name, arguments))
        except ExecuteError as e:
            raise AttachError(f"QEMU: {name}: {e}") from None

    async def hmp(self, line: str, cpu_index: int | None = None) -> str:
        """One HMP line through QEMU's human-monitor-command; ``\\n`` line ends."""
        args: dict = {"command-line": line}
        if cpu_index is not None:
            args["cpu-index"] = cpu_index
        out = await self.execute("human-monitor-command", args)
        return out.replace("\r\n", "\n")

    def call_sync(self, coro):
        """Run ``coro`` on the event loop from the machine thread and wait for it."""
        if self.loop is None or threading.get_ident() == self._loop_thread:
            coro.close()
            raise RuntimeError("call_sync must not run on the event loop thread")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()
