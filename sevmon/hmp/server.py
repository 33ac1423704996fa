"""HMP on a UNIX socket, as QEMU's ``-monitor unix:PATH,server`` gives it.

A banner, then ``(qemu) `` before each command; one command per line; output lines end
in ``\\r\\n``. No line editing or echo (``socat -`` and ``nc -U`` provide the line).
Several clients at once, each with its own connection; commands share the machine
thread with QMP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sevmon.cmdlog import hmp_label, timed
from sevmon.unixsock import listen_unix

log = logging.getLogger("sevmon.hmp")

PROMPT = "(qemu) "
MAX_LINE = 1 << 20
HMP_SOCKET_OUTPUT_LIMIT = 64 << 20  # a terminal has no 10 MiB line limit; memory stays bounded


SUSPEND_POLL = 0.1  # how often a suspended monitor checks whether its command is done (QEMU: every second)


class HMPServer:
    def __init__(self, runner, monitor):
        self.runner = runner
        self.monitor = monitor
        self.servers = []
        self.writers: set[asyncio.StreamWriter] = set()

    async def listen(self, path: str) -> None:
        sock = listen_unix(path)
        self.servers.append(await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_LINE))

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            writer.write(f"{self.monitor.banner()}\r\n{PROMPT}".encode())
            await writer.drain()
            while True:
                try:
                    raw = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    break  # as in QEMU, a line runs only when its newline arrives
                except asyncio.LimitOverrunError:
                    await _discard_line(reader)
                    writer.write(f"Error: line longer than {MAX_LINE} bytes ignored\r\n{PROMPT}".encode())
                    await writer.drain()
                    continue
                line = raw.decode("utf-8", "replace").rstrip("\r\n")

                with timed(f"HMP {hmp_label(line)}"):
                    out, until = await self.runner.command(
                        lambda line=line: self.monitor.run_interactive(line, limit=HMP_SOCKET_OUTPUT_LIMIT))
                if until is not None:  # the monitor is suspended (migrate without -d): no prompt, no input
                    writer.write(out.replace("\n", "\r\n").encode("utf-8", "replace"))
                    await writer.drain()
                    out = ""
                    while not await self.runner.command(until):
                        await asyncio.sleep(SUSPEND_POLL)
                writer.write((out.replace("\n", "\r\n") + PROMPT).encode("utf-8", "replace"))
                await writer.drain()
                if reader.at_eof():
                    break
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        except Exception:
            log.exception("HMP client failed")
        finally:
            self.writers.discard(writer)
            writer.close()

    async def close(self) -> None:
        for srv in self.servers:
            srv.close()
        for w in list(self.writers):
            with contextlib.suppress(Exception):
                w.transport.abort()  # unsent output to a client that stopped reading is dropped
        await asyncio.sleep(0)


async def _discard_line(reader: asyncio.StreamReader) -> None:
    while True:
        try:
            await reader.readuntil(b"\n")
            return
        except asyncio.LimitOverrunError as e:
            await reader.readexactly(e.consumed)
        except asyncio.IncompleteReadError:
            return
