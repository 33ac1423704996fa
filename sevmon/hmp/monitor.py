"""The human monitor: one line in, QEMU's text out.

Follows ``monitor/hmp.c``: the command name ends at a space or ``/``; unknown names print
``unknown command: '...'``; sub-tables (``info``) recurse; argument errors print QEMU's
message then ``Try "help CMD" for more information``; ``help`` prints
``name params -- help`` lines from the (sorted) tables. Output uses ``\\n``; the QMP
bridge and the HMP socket turn it into ``\\r\\n`` as QEMU's monitor_puts does.
"""

from __future__ import annotations

import logging

from sevmon.debug.ops import DebugError
from sevmon.errors import CommandError
from sevmon.hmp.errors import HmpError
from sevmon.hmp.expr_registers import register_lookup
from sevmon.hmp.parser import FmtDefaults, parse_arguments
from sevmon.hmp.table import CommandTable, HmpCommand

log = logging.getLogger("sevmon.hmp")


class OutputLimit(Exception):
    """One command printed more than its monitor accepts."""


class HmpContext:
    """What an HMP handler gets: the machine, its runner (jobs), the selected vCPU, and a bounded output buffer."""

    def __init__(self, monitor: HumanMonitor, cpu_index: int, limit: int):
        self.monitor = monitor
        self.machine = monitor.machine
        self.runner = monitor.runner
        self.cpu_index = cpu_index
        self.limit = limit
        self._size = 0
        self._out: list[str] = []

    @property
    def cpu(self):
        return self.machine.cpus[self.cpu_index]

    def print(self, text: str = "", end: str = "\n") -> None:
        self._size += len(text) + len(end)
        if self._size > self.limit:
            raise OutputLimit()
        self._out.append(text + end)

    def text(self) -> str:
        return "".join(self._out)


class HumanMonitor:
    """Shared by every HMP user of one machine (the format defaults are global in QEMU)."""

    def __init__(self, runner, table: CommandTable, info_table: CommandTable):
        self.runner = runner
        self.machine = runner.machine
        self.table = table
        self.info_table = info_table
        self.fmt = FmtDefaults()
        info = table.find("info")
        if info is not None:
            info.sub_table = info_table.commands

    def run(self, line: str, cpu_index: int = 0, limit: int = 8 << 20) -> str:
        """Execute one command line; return its output (``\\n`` line ends).

        Output beyond ``limit`` characters is cut with a final line saying so: a QMP reply
        is one line, and qemu.qmp clients drop the connection on lines over 10 MiB.
        """
        ctx = HmpContext(self, cpu_index, limit)
        try:
            self._dispatch(ctx, line)
        except OutputLimit:
            ctx._out.append(f"sevmon: output truncated: one command may print at most {limit >> 20} MiB\n")
        except CommandError as e:  # QEMU's hmp_handle_error: what was printed stays, then the error
            ctx.print(f"Error: {e.desc}")
        except DebugError as e:
            ctx.print(f"Error: {e.reason}")
        except Exception as e:  # a bug prints one line, never a traceback
            log.exception("HMP command failed: %r", line)
            ctx.print(f"Error: internal error: {e}")
        return ctx.text()

    def _dispatch(self, ctx: HmpContext, line: str) -> None:
        p, commands, cmd = 0, self.table.commands, None
        while True:
            while p < len(line) and line[p].isspace():
                p += 1
            if p >= len(line):
                if cmd is None:
                    return
                break
            start = p
            while p < len(line) and line[p] != "/" and not line[p].isspace():
                p += 1
            word = line[start:p]
            found = next((c for c in commands if c.matches(word)), None)
            if found is None:
                ctx.print(f"unknown command: '{line[:p]}'")
                return
            cmd = found
            while p < len(line) and line[p].isspace():
                p += 1
            if cmd.sub_table is None or p >= len(line):
                break
            commands = cmd.sub_table
        try:
            args = parse_arguments(cmd.names[0], cmd.args_type, line, p, self.fmt, self._reg_getter(ctx))
        except HmpError as e:
            ctx.print(str(e))
            q = p
            while q > 0 and line[q - 1].isspace():
                q -= 1
            ctx.print(f'Try "help {line[:q].lstrip()}" for more information')
            return
        cmd.handler(ctx, **args)

    @staticmethod
    def _reg_getter(ctx: HmpContext):
        return register_lookup(ctx.cpu)

    # -- help ----------------------------------------------------------------------------
    def help(self, ctx: HmpContext, name: str | None) -> None:
        words = name.split() if name else []
        self._help_dump(ctx, self.table.commands, words, 0)

    def _help_dump(self, ctx, commands: list[HmpCommand], words: list[str], i: int) -> None:
        if i >= len(words):
            for c in commands:
                ctx.print(f"{''.join(w + ' ' for w in words[:i])}{c.name} {c.params} -- {c.help}")
            return
        for c in commands:
            if c.matches(words[i]):
                if c.sub_table is not None:
                    self._help_dump(ctx, c.sub_table, words, i + 1)
                else:
                    ctx.print(f"{''.join(w + ' ' for w in words[:i])}{c.name} {c.params} -- {c.help}")
                return
        ctx.print("unknown command: '" + " ".join(words[:i + 1]) + "'")
