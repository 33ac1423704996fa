"""The QMP server: UNIX sockets with mode 0600, sessions, event broadcast, command execution.

Commands execute one at a time on the machine thread (:mod:`sevmon.machine.runner`, QEMU's big lock) so the
asyncio loop stays free for I/O: greetings, parse errors and other clients are never held up by a client that is
slow to read or write.
"""

from __future__ import annotations

import asyncio
import logging

from sevmon import PACKAGE, QEMU_VERSION
from sevmon.cmdlog import qmp_label, timed
from sevmon.errors import CommandError
from sevmon.qmp.dispatch import CommandRegistry, Request
from sevmon.qmp.session import QMPSession, event_message
from sevmon.unixsock import listen_unix

log = logging.getLogger("sevmon.qmp")


class CommandContext:
    """What a QMP handler may use: the machine, its runner (jobs), the server (for HMP), the session."""

    def __init__(self, server: QMPServer, session: QMPSession | None):
        self.server = server
        self.machine = server.machine
        self.runner = server.runner
        self.session = session


class QMPServer:
    def __init__(self, runner, registry: CommandRegistry, hmp):
        self.runner = runner
        self.machine = runner.machine
        self.registry = registry
        self.hmp = hmp
        self.sessions: set[QMPSession] = set()
        self.servers: list[asyncio.base_events.Server] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.shutdown = asyncio.Event()
        self.machine.add_listener(self._on_event)

    @staticmethod
    def version_info() -> dict:
        major, minor, micro = QEMU_VERSION
        return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": PACKAGE}

    # -- sockets -----------------------------------------------------------------------
    async def listen(self, path: str) -> None:
        self.loop = asyncio.get_running_loop()
        sock = listen_unix(path)
        srv = await asyncio.start_unix_server(self._client, sock=sock, limit=1 << 20)
        self.servers.append(srv)

    async def _client(self, reader, writer) -> None:
        session = QMPSession(self, reader, writer)
        self.sessions.add(session)
        try:
            await session.run()
        except asyncio.CancelledError:  # the daemon is shutting down
            pass
        except Exception:  # a bug must not take the daemon down
            log.exception("QMP session failed")
        finally:
            self.sessions.discard(session)

    async def close(self) -> None:
        """Stop listening, let in-flight commands finish and their replies flush, close."""
        for srv in self.servers:
            srv.close()
        await self.runner.idle()  # the machine thread is idle
        for _ in range(3):
            await asyncio.sleep(0)  # sessions enqueue the replies of those commands
        sessions = list(self.sessions)
        for s in sessions:
            s.close()
        if sessions:
            await asyncio.wait([asyncio.ensure_future(s.finished.wait()) for s in sessions], timeout=2)
        for s in sessions:  # a client that does not read gets no more grace
            if not s.finished.is_set():
                s.writer.transport.abort()
        await asyncio.sleep(0)

    # -- events ------------------------------------------------------------------------
    def _on_event(self, name: str, data: dict | None, timestamp: dict | None = None) -> None:
        msg = event_message(name, data, timestamp)
        if self.loop is None:
            return
        self.loop.call_soon_threadsafe(self._broadcast, msg)
        if name == "SHUTDOWN" and self.machine.capabilities.ends_with_shutdown:
            self.loop.call_soon_threadsafe(self.shutdown.set)

    def _broadcast(self, msg: dict) -> None:
        for s in list(self.sessions):
            s.event(msg)

    # -- execution ---------------------------------------------------------------------
    async def execute(self, req: Request, session: QMPSession | None):
        with timed(qmp_label(req.name, req.args)):
            return await self._execute(req, session)

    async def _execute(self, req: Request, session: QMPSession | None):
        ctx = CommandContext(self, session)
        if req.forward:
            return await self.registry.forwarder.forward(ctx, req)
        handler = self.registry.handlers[req.name]
        kwargs = {k.replace("-", "_"): v for k, v in req.args.items()}
        if req.name in self.registry.inline:
            result = handler(ctx, **kwargs)
            await asyncio.sleep(0)  # one request at a time per turn: a pipelining client cannot hog the loop
            return result

        try:
            return await self.runner.command(lambda: handler(ctx, **kwargs))
        except CommandError:
            raise
        except Exception as e:  # never a traceback on the wire
            log.exception("command %s failed", req.name)
            raise CommandError(f"{req.name}: internal error: {e}") from None
