"""Forwarding: what sevmon does not run goes to QEMU as it came, and QEMU's reply comes back.

One mechanism for each front end:

* QMP: :class:`QmpForwarder` is the registry's ``forwarder``. Requests it ``wants`` skip
  sevmon's schema (QEMU checks them); they are sent under an id of the link's own and the
  reply (``return`` or ``error``, QEMU's class and text) goes back under the client's id.
  A well-formed ``human-monitor-command`` is sevmon's: its line goes to the human monitor
  below, which runs it or passes it on.
* HMP: :class:`AttachedMonitor` reads each line once (:meth:`HumanMonitor.resolve`, then
  the arguments): a command sevmon's table does not hold goes to QEMU as it came; one it
  holds runs where its registration says (``attached``: sevmon, QEMU, or QEMU unless
  debugging is refused because QEMU would read guest memory for it).

Register expressions (``$rsp``, ``$cr3``) are sevmon's wherever a command takes an
expression: QEMU knows only its 32-bit names, so a line QEMU runs gets the values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from sevmon.attach.errors import AttachError
from sevmon.errors import CommandError
from sevmon.hmp.monitor import HmpContext, HumanMonitor
from sevmon.hmp.table import OWN, QEMU_READS_MEMORY, HmpCommand

log = logging.getLogger("sevmon")

_HMP_ARGS = {"command-line", "cpu-index"}
_SIZE_LETTERS = {1: "b", 2: "h", 4: "w", 8: "g"}


class QmpForwarder:
    """``reads_memory``: QEMU's QMP commands that read guest memory (refused, not
    forwarded, when ``refusal()`` gives a reason)."""

    def __init__(self, link, registry, cpu_count: int, reads_memory: set[str],
                 refusal: Callable[[], str | None]):
        self.link = link
        self.registry = registry
        self.cpu_count = cpu_count
        self.reads_memory = reads_memory
        self.refusal = refusal

    def wants(self, name: str, arguments) -> bool:
        if name == "human-monitor-command":
            return not self._well_formed(arguments)
        return name not in self.registry

    def _well_formed(self, arguments) -> bool:
        """A human-monitor-command QEMU would run: sevmon's monitor takes it. QEMU gives every
        other one (its errors) its own answer."""
        if not isinstance(arguments, dict) or not set(arguments) <= _HMP_ARGS:
            return False
        line, cpu = arguments.get("command-line"), arguments.get("cpu-index", 0)
        return isinstance(line, str) and type(cpu) is int and 0 <= cpu < self.cpu_count

    async def forward(self, ctx, req):
        if req.name in self.reads_memory and (reason := self.refusal()):
            raise CommandError(reason)
        msg = {"exec-oob" if req.oob else "execute": req.name}
        if req.args:
            msg["arguments"] = req.args
        reply = await self.link.raw(msg)
        if "error" in reply:
            err = reply["error"]
            raise CommandError(err.get("desc", ""), err.get("class", "GenericError"))
        return reply.get("return")


class AttachedMonitor(HumanMonitor):
    """The human monitor of an attached sevmon: each line read once, then run by sevmon or QEMU."""

    def __init__(self, runner, table, info_table, link, refusal: Callable[[], str | None]):
        super().__init__(runner, table, info_table)
        self.link = link
        self.refusal = refusal
        self._qemu_cpu: int | None = None

    def banner(self) -> str:
        """QEMU's, as ``sevmon shell`` shows it: sevmon stands in for QEMU's monitor."""
        try:
            q = self.link.version["qemu"]
            return f"QEMU {q['major']}.{q['minor']}.{q['micro']} monitor - type 'help' for more information"
        except (TypeError, KeyError):
            return super().banner()

    def run(self, line: str, cpu_index: int | None = 0, limit: int = 8 << 20) -> str:
        """``cpu_index`` None: the client named no vCPU (QMP without ``cpu-index``); sevmon's
        commands use vCPU 0, and QEMU gets the line without one, as the client sent it."""
        self._qemu_cpu = cpu_index  # lines run one at a time, on the machine thread
        return super().run(line, cpu_index or 0, limit)

    def _dispatch(self, ctx: HmpContext, line: str) -> None:
        cmd, p, _ = self.resolve(line)
        if cmd is None:  # not in sevmon's table: QEMU's, unknown words included
            self._forward(ctx, line)
            return
        args = self.parse(ctx, cmd, line, p)
        if args is None:
            return
        who = cmd.when_attached(args)
        if who is None or who == OWN:
            cmd.handler(ctx, **args)
            return
        if who == QEMU_READS_MEMORY and (reason := self.refusal()):
            _refuse(ctx, cmd, args, reason)
            return
        if cmd.names[0] == "migrate" and ctx.interactive and not args.get("detach"):
            self._migrate_and_wait(ctx, line, p, cmd, args)
            return
        self._forward(ctx, line if "$" not in line[p:] else line[:p].rstrip() + _render(cmd, args))

    def run_interactive(self, line: str, limit: int = 8 << 20):
        self._qemu_cpu = 0  # the HMP socket's lines run on vCPU 0, as they did before migrate could wait
        return super().run_interactive(line, limit)

    def _migrate_and_wait(self, ctx: HmpContext, line: str, p: int, cmd: HmpCommand, args: dict) -> None:
        """On sevmon's HMP socket (interactive), ``migrate`` without ``-d`` waits for the migration to end, as on
        QEMU's own interactive monitor (QEMU's human-monitor-command, which sevmon's link uses, would continue
        detached): QEMU starts it detached and the prompt waits for QEMU's query-migrate."""
        out = self.qemu("migrate -d " + line[p:].strip(), self._qemu_cpu)
        ctx._out.append(out)
        if not out:
            ctx.suspend_until = self._migration_done

    def _migration_done(self) -> bool:
        q = self.link.call_sync(self.link.execute("query-migrate"))
        if q.get("status") in ("setup", "active"):
            return False
        if "error-desc" in q:
            log.error("%s", q["error-desc"])
        return True

    def _forward(self, ctx: HmpContext, line: str) -> None:
        ctx._out.append(self.qemu(line, self._qemu_cpu))  # QEMU's text as it is: its size is QEMU's business

    def qemu(self, line: str, cpu_index: int | None = 0) -> str:
        """QEMU's own text for ``line`` (``\n`` line ends)."""
        try:
            return self.link.call_sync(self.link.hmp(line, cpu_index))
        except AttachError as e:
            return f"Error: {e}\n"


def _refuse(ctx: HmpContext, cmd: HmpCommand, args: dict, reason: str) -> None:
    """Debugging is refused and QEMU would read guest memory: say so in QEMU's words
    (a disassembly's ``ADDR: unable to read memory``, otherwise ``Error: ...``)."""
    if args.get("format") == "i" and "addr" in args:
        ctx.print(f"0x{args['addr'] & (1 << 64) - 1:x}: unable to read memory")
    else:
        ctx.print(f"Error: {reason}")


def _render(cmd: HmpCommand, args: dict) -> str:
    """The arguments of a parsed line, written back with every expression as its value
    (sevmon evaluated ``$reg``; QEMU knows no ``$rsp``)."""
    out = []
    for item in filter(None, cmd.args_type.split(",")):
        key, _, typ = item.partition(":")
        c = typ[:1]
        if c == "/":
            out.append(f"/{args['count']}{args['format']}{_SIZE_LETTERS.get(args['size'], '')}")
        elif key not in args:
            continue
        elif c in "il":
            out.append(f"{args[key] & (1 << 64) - 1:#x}")
        elif c == "-":
            if args[key]:
                out.append(f"-{typ[1]}")
        elif c in "sF":
            v = args[key]
            esc = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
            out.append(f'"{esc}"' if v == "" or any(ch.isspace() or ch in '"\\' for ch in v) else v)
        else:  # S: the rest of the line
            out.append(str(args[key]))
    return "".join(" " + a for a in out)
