"""One gdb connection: the Remote Serial Protocol answered from the machine's state.

The stub touches only what every kind of guest has: ``machine.memory`` (debug access:
C-bit stripped, DBG_DECRYPT/DBG_ENCRYPT, page cache), ``machine.cpus`` (registers, whose
page tables translate virtual addresses, with the same walker ``gva2gpa`` and ``x`` use),
the run state (``stop``/``cont``) and the machine's events (a STOP answers an outstanding
``c``). Every one of those accesses runs as a monitor command on the shared machine thread
(:meth:`sevmon.machine.runner.MachineRunner.command`).

QEMU's conventions: attaching stops the guest (gdb expects a stopped target); thread ids
are vCPU index + 1; a failed memory access is ``E14`` (gdb: "Cannot access memory at
address"), malformed arguments ``E22``; ``Qqemu.PhyMemMode:1`` switches ``m``/``M``/``X``
to guest-physical addresses. Differences, and why: detaching resumes the guest only if it
was running when gdb attached (QEMU always resumes, which would start a guest a QMP user
had paused); breakpoints and single-step are answered as unsupported (empty reply): the
guest is a model or a memory image and executes no instructions; ``k`` closes the
connection instead of quitting the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import re

from sevmon.commands import runstate
from sevmon.commands.memory import virtual_reader
from sevmon.debug.refusal import cbit_mask
from sevmon.errors import CommandError
from sevmon.gdb.no_registers import attach_stop, unavailable
from sevmon.gdb.packets import (
    E_FAULT,
    E_INVAL,
    PACKET_SIZE,
    Interrupt,
    Nack,
    PacketReader,
    escape,
    frame,
    unescape,
)
from sevmon.gdb.target import X86_64, target_for
from sevmon.machine.kernel_root import check_address, walk_cpu
from sevmon.memory.ram import MemoryAccessError
from sevmon.x86.cpu import RegistersUnavailable
from sevmon.x86.translation import write_virtual

log = logging.getLogger("sevmon.gdb")

SIGINT = 2
MAX_READ = PACKET_SIZE // 2            # an m reply is hex: two characters per byte
MONITOR_OUTPUT_LIMIT = 8 << 20
U64 = (1 << 64) - 1
_HEX = re.compile(rb"^[0-9a-fA-F]+$")


class BadRequest(ValueError):
    """Malformed arguments: the reply is E22."""


def _int(text: bytes) -> int:
    if not _HEX.match(text):
        raise BadRequest(text)
    return int(text, 16)


def _addr_len(args: bytes) -> tuple[int, int]:
    addr, sep, length = args.partition(b",")
    if not sep:
        raise BadRequest(args)
    return _int(addr) & U64, _int(length)


def _thread_id(text: bytes) -> int:
    """gdb's thread-id: hex, ``-1`` (all) or ``0`` (any); ``pP.T`` from a multiprocess gdb."""
    if text.startswith(b"p") and b"." in text:
        text = text.split(b".", 1)[1]
    if text == b"-1":
        return -1
    return _int(text)


class GdbSession:
    def __init__(self, server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.server = server
        self.machine = server.machine
        self.reader = reader
        self.writer = writer
        self.packets = PacketReader()
        self.cpu_index = 0            # Hg: whose registers and page tables
        self.phys = False             # Qqemu.PhyMemMode
        self.waiting = False          # a c/vCont;c is outstanding: the next stop is reported
        self.resume_on_detach = False
        self.done = False
        self.exited = False           # the daemon is quitting (SHUTDOWN): never resume on the way out
        self.attached = True          # False once gdb detached (D) or left: a new gdb may connect
        self.target = None            # the vCPU's description, read on the machine thread when gdb attaches
        self.loop = asyncio.get_running_loop()

    # -- plumbing ----------------------------------------------------------------------------
    async def call(self, fn):
        return await self.server.runner.command(fn)

    def send(self, payload: bytes | str) -> None:
        self._put(frame(payload))

    def _put(self, raw: bytes) -> None:
        if not self.writer.is_closing():  # a gdb that vanished gets nothing more
            self.writer.write(raw)

    @property
    def cpu(self):
        return self.machine.cpus[self.cpu_index]

    def _tid(self) -> str:
        return f"{self.cpu_index + 1:02x}"

    def _on_event(self, name: str, data, timestamp=None) -> None:  # machine thread (or the loop, attached)
        try:
            self.loop.call_soon_threadsafe(self._event, name)
        except RuntimeError:  # the loop is gone (daemon exiting): nobody to tell
            pass

    def _event(self, name: str) -> None:
        if name == "STOP" and self.waiting:
            self._report_stop(SIGINT)
        elif name == "SHUTDOWN":
            self.end(exited=True)

    def end(self, exited: bool = False) -> None:
        """Close the connection; a gdb waiting in ``continue`` while the daemon quits hears
        that the target exited (W00). Called on SHUTDOWN and by the server, whichever is first."""
        self.exited = self.exited or exited
        if self.waiting and exited:
            self.waiting = False
            self.send("W00")
        self.done = True
        self.writer.close()

    def _report_stop(self, sig: int) -> None:
        self.waiting = False
        self.send(f"T{sig:02x}thread:{self._tid()};")

    # -- the connection --------------------------------------------------------------------
    async def run(self) -> None:
        self.machine.add_listener(self._on_event)
        try:
            def attach():
                was = self.machine.stop()
                cpu = self.machine.cpus[0]  # an SEV-ES guest (registers unknown) is a 64-bit guest
                return was, target_for(cpu) if cpu.registers_known else X86_64
            self.resume_on_detach, self.target = await self.call(attach)
            while not self.done:
                data = await self.reader.read(65536)
                if not data:
                    break
                for ev in self.packets.feed(data):
                    if isinstance(ev, Nack):
                        log.debug("gdb: %s", ev.reason)
                        self._put(b"-")
                    elif isinstance(ev, Interrupt):
                        await self._interrupt()
                    else:
                        self._put(b"+")
                        reply = await self._handle(ev.payload)
                        if reply is not None:
                            self.send(reply)
                    if self.done or self.writer.is_closing():
                        break
                await self.writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.attached = False
            self.machine.remove_listener(self._on_event)
            self.done = True
            if self.resume_on_detach and not self.exited:
                await self._cont_quietly()
            self.writer.close()

    async def _cont_quietly(self) -> None:
        """Resume after gdb leaves, unless the guest cannot run (reset required, dump running)."""
        try:
            await self.call(lambda: runstate.cont(self.server.runner))
        except (CommandError, RuntimeError):
            pass

    async def _handle(self, pkt: bytes) -> bytes | str | None:
        try:
            return await self._dispatch(pkt)
        except (MemoryAccessError, RegistersUnavailable):  # no CR3 to walk from: gdb says it cannot access it
            return E_FAULT
        except ValueError:  # BadRequest, bad hex, not ASCII
            return E_INVAL
        except OSError:  # gdb vanished while we answered: the session ends
            raise
        except Exception:  # a bug answers one error packet; the daemon goes on
            log.exception("gdb packet %r failed", pkt[:64])
            return E_INVAL

    async def _dispatch(self, pkt: bytes) -> bytes | str | None:
        if not pkt:
            return ""
        cmd, args = pkt[:1], pkt[1:]
        if cmd == b"?":
            return await self.call(lambda: attach_stop(self.cpu, self._tid()))
        if cmd in (b"g", b"p", b"G", b"P") and not await self.call(lambda: self.cpu.registers_known):
            return unavailable(self.target, cmd, _int(args) if cmd == b"p" else None)
        if cmd == b"g":
            return (await self.call(lambda: self.target.read_all(self.cpu))).hex()
        if cmd in (b"G", b"P") and not self.machine.capabilities.write_registers:
            return E_INVAL  # the registers live in QEMU, which has no command to write them
        if cmd == b"G":
            data = bytes.fromhex(args.decode("ascii"))
            await self.call(lambda: self.target.write_all(self.cpu, data))
            return "OK"
        if cmd == b"p":
            n = _int(args)
            if n >= len(self.target.regs):
                return E_FAULT
            return (await self.call(lambda: self.target.read(self.cpu, n))).hex()
        if cmd == b"P":
            num, sep, val = args.partition(b"=")
            n = _int(num)
            if not sep or n >= len(self.target.regs):
                return E_INVAL
            data = bytes.fromhex(val.decode("ascii"))
            if len(data) != self.target.size(n):
                return E_INVAL
            await self.call(lambda: self.target.write(self.cpu, n, data))
            return "OK"
        if cmd == b"m":
            addr, length = _addr_len(args)
            if length > MAX_READ:
                return E_INVAL
            return (await self.call(lambda: self._read(addr, length))).hex()
        if cmd in (b"M", b"X"):
            head, sep, body = args.partition(b":")
            if not sep:
                return E_INVAL
            addr, length = _addr_len(head)
            data = bytes.fromhex(body.decode("ascii")) if cmd == b"M" else unescape(body)
            if len(data) != length:
                return E_INVAL
            if length:
                await self.call(lambda: self._write(addr, data))
            return "OK"
        if cmd in (b"c", b"C"):
            return await self._resume()
        if cmd == b"v":
            return await self._v(args)
        if cmd == b"H":
            return self._select(args)
        if cmd == b"T":
            t = _thread_id(args)
            return "OK" if 1 <= t <= len(self.machine.cpus) else E_INVAL
        if cmd in (b"q", b"Q"):
            return await self._query(pkt)
        if cmd == b"D":  # gdb closes the connection itself after the OK
            self.attached = False
            if self.resume_on_detach:
                self.resume_on_detach = False
                await self._cont_quietly()
            return "OK"
        if cmd == b"k":
            self.done = True
            return None
        if cmd in (b"s", b"S"):
            return self._no_step()
        return ""  # Z/z (breakpoints) and anything else: unsupported

    # -- memory ------------------------------------------------------------------------------
    def _read(self, addr: int, length: int) -> bytes:
        if self.phys:
            return self.machine.memory.read(addr, length)
        return virtual_reader(self.machine, self.cpu)(addr, length)

    def _write(self, addr: int, data: bytes) -> None:
        mem = self.machine.memory
        if self.phys:
            mem.write(addr, data)
            return
        # every page translated first (a write that would fault half-way writes nothing), one write per run
        # (from the kernel's own tables when the vCPU cannot be read, as reads do)
        check_address(self.machine, self.cpu, addr)
        write_virtual(mem, walk_cpu(self.machine, self.cpu), addr & U64, data, cbit_mask(self.machine))

    # -- run control -------------------------------------------------------------------------
    async def _resume(self) -> str | None:
        self.waiting = True
        try:
            await self.call(lambda: runstate.cont(self.server.runner))
        except CommandError as e:
            self.waiting = False
            self.send("O" + (e.desc + "\n").encode().hex())
            return "E01"
        if self.waiting and not self.machine.running:  # stopped again before we looked
            self._report_stop(SIGINT)
        return None

    def _no_step(self) -> str:
        """gdb waits for a stop reply after a step: an error reply tells it, and its warning
        follows our explanation: the machine's reason (a model or a memory image executes nothing;
        an attached QEMU's monitor cannot step)."""
        reason = self.machine.capabilities.no_step_reason
        self.send("O" + f"sevmon: single-step is not supported: {reason}\n".encode().hex())
        return "E01"

    async def _interrupt(self) -> None:
        if not self.waiting:
            return
        await self.call(self.machine.stop)
        if self.waiting and not self.machine.running:  # it was already stopped: no STOP event
            self._report_stop(SIGINT)

    async def _v(self, args: bytes) -> str | None:
        if args == b"Cont?":
            return "vCont;c;C"
        if args.startswith(b"Cont;"):
            actions = [a.split(b":")[0][:1] for a in args[5:].split(b";")]
            if actions and all(a in (b"c", b"C") for a in actions):
                return await self._resume()
            if any(a in (b"s", b"S", b"r") for a in actions):
                return self._no_step()
            return ""
        if args.startswith(b"Kill"):
            self.done = True
            return "OK"
        return ""

    def _select(self, args: bytes) -> str:
        if args[:1] not in (b"g", b"c"):
            return ""
        t = _thread_id(args[1:])
        if t in (0, -1):
            return "OK"
        if not 1 <= t <= len(self.machine.cpus):
            return E_INVAL
        if args[:1] == b"g":
            self.cpu_index = t - 1
        return "OK"

    # -- queries -----------------------------------------------------------------------------
    async def _query(self, pkt: bytes) -> str | bytes | None:
        name, _, rest = pkt.partition(b":")
        if name == b"qSupported":
            return f"PacketSize={PACKET_SIZE:x};qXfer:features:read+;vContSupported+"
        if pkt.startswith(b"qXfer:features:read:"):
            annex, _, span = pkt[len(b"qXfer:features:read:"):].partition(b":")
            if annex != b"target.xml":
                return "E00"
            off, length = _addr_len(span)
            xml = self.target.xml.encode()
            chunk = xml[off:off + length]
            return (b"m" if off + length < len(xml) else b"l") + escape(chunk)
        if pkt == b"qAttached" or pkt.startswith(b"qAttached:"):
            return "1"
        if pkt == b"qC":
            return f"QC{self._tid()}"
        if pkt == b"qfThreadInfo":
            return "m" + ",".join(f"{c.index + 1:02x}" for c in self.machine.cpus)
        if pkt == b"qsThreadInfo":
            return "l"
        if pkt.startswith(b"qThreadExtraInfo,"):
            t = _thread_id(pkt[len(b"qThreadExtraInfo,"):])
            if not 1 <= t <= len(self.machine.cpus):
                return E_INVAL
            cpu = self.machine.cpus[t - 1]
            state = "running" if self.machine.running else "halted " if cpu.halted else "paused"
            return f"CPU#{cpu.index} [{state}]".encode().hex()
        if pkt.startswith(b"qRcmd,"):
            return await self._monitor(bytes.fromhex(pkt[6:].decode("ascii")).decode("utf-8", "replace"))
        if pkt == b"qqemu.PhyMemMode":
            return "1" if self.phys else "0"
        if name == b"Qqemu.PhyMemMode":
            if rest not in (b"0", b"1"):
                return E_INVAL
            self.phys = rest == b"1"
            return "OK"
        if pkt == b"qqemu.Supported":
            return "PhyMemMode"
        return ""

    async def _monitor(self, line: str) -> str:
        """``monitor LINE``: sevmon's HMP, its text as console output (\\r\\n, as QEMU's monitor)."""
        idx = self.cpu_index
        out = await self.call(lambda: self.server.monitor.run(line, idx, limit=MONITOR_OUTPUT_LIMIT))
        data = out.replace("\n", "\r\n").encode()
        step = MAX_READ - 1
        for i in range(0, len(data), step):
            self.send(b"O" + data[i:i + step].hex().encode())
            await self.writer.drain()
        return "OK"
