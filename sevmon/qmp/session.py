"""One QMP connection: greeting, negotiation, ordered request handling, events.

Every connection has its own negotiation state (QEMU greets only one client per socket;
sevmon serves all of them at once, which no client can notice). Replies leave in request
order; events go to negotiated sessions only. Output is queued per session and written
by its own task, so a client that stops reading delays nobody but itself; one that lets
more than ``MAX_BACKLOG`` bytes pile up is disconnected.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sevmon.errors import CommandError
from sevmon.qmp.dispatch import NO_ID, CheckFailed, check_request, reply
from sevmon.qmp.json_stream import JSONParseError, JSONStreamParser
from sevmon.qmp.json_writer import to_qemu_json

log = logging.getLogger("sevmon.qmp")

READ_CHUNK = 64 * 1024
FEED_SLICE = 4096  # input bytes parsed between two turns of the event loop
MAX_BACKLOG = 64 << 20


def event_message(name: str, data: dict | None, timestamp: dict | None = None) -> dict:
    """QEMU's event shape: no ``data`` key at all for events without data. ``timestamp``:
    an event relayed from QEMU keeps QEMU's own."""
    now = time.time()
    if timestamp is None:
        timestamp = {"seconds": int(now), "microseconds": int((now % 1) * 1_000_000)}
    msg = {"timestamp": timestamp, "event": name}
    if data is not None:
        msg["data"] = data
    return msg


class QMPSession:
    def __init__(self, server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.reader = reader
        self.writer = writer
        self.parser = JSONStreamParser()
        self.negotiated = False
        self.oob_enabled = False
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._backlog = 0
        self.closed = False
        self.finished = asyncio.Event()

    # -- output ---------------------------------------------------------------------------
    def send(self, obj: dict) -> None:
        if self.closed:
            return
        data = (to_qemu_json(obj) + "\r\n").encode("ascii")
        self._backlog += len(data)
        if self._backlog > MAX_BACKLOG:
            log.warning("QMP client does not read its replies; disconnecting it")
            self.close()
            self.writer.transport.abort()
            return
        self._out.put_nowait(data)

    async def _writer_task(self) -> None:
        try:
            while True:
                data = await self._out.get()
                if data is None:
                    break
                self._backlog -= len(data)
                self.writer.write(data)
                await self.writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.closed = True
            self.writer.close()
            self.finished.set()

    def close(self) -> None:
        """Finish: queued output is still written, then the connection closes."""
        if not self.closed:
            self.closed = True
            self._out.put_nowait(None)
            self.reader.feed_eof()  # wake a pending read

    def event(self, msg: dict) -> None:
        if self.negotiated:
            self.send(msg)

    # -- input ----------------------------------------------------------------------------
    async def run(self) -> None:
        writer_task = asyncio.create_task(self._writer_task())
        self.send({"QMP": {"version": self.server.version_info(), "capabilities": ["oob"]}})
        try:
            while not self.closed:
                try:
                    data = await self.reader.read(READ_CHUNK)
                except (ConnectionError, OSError):
                    break
                if not data:
                    break
                for at in range(0, len(data), FEED_SLICE):
                    if self.closed:
                        break
                    for msg in self.parser.feed(data[at:at + FEED_SLICE]):
                        if self.closed:
                            break
                        await self.handle(msg)
                    # a parse error's reply awaits nothing, so a client sending garbage as fast as it can would
                    # keep the loop to itself: every slice, the other clients get their turn
                    await asyncio.sleep(0)
        finally:
            self.close()
            try:
                await asyncio.wait_for(writer_task, timeout=5)
            except (TimeoutError, Exception):
                writer_task.cancel()

    async def handle(self, msg) -> None:
        if isinstance(msg, JSONParseError):
            self.send(reply(NO_ID, error=CommandError(msg.desc)))
            return
        try:
            req = check_request(msg, negotiated=self.negotiated, oob_enabled=self.oob_enabled,
                                registry=self.server.registry)
        except CheckFailed as f:
            self.send(reply(f.id, error=f.error))
            return
        if req.name == "qmp_capabilities":
            self.send(self._capabilities(req))
            return
        try:
            result = await self.server.execute(req, self)
        except CommandError as e:
            self.send(reply(req.id, error=e))
            return
        self.send(reply(req.id, result=result))

    def _capabilities(self, req) -> dict:
        if self.negotiated:
            return reply(req.id, error=CommandError(
                "Capabilities negotiation is already complete, command ignored", "CommandNotFound"))
        enable = req.args.get("enable", [])
        bad = [c for c in enable if c != "oob"]
        if bad:
            return reply(req.id, error=CommandError(f"Capability {', '.join(bad)} not available"))
        self.oob_enabled = "oob" in enable
        self.negotiated = True
        return reply(req.id, result={})
