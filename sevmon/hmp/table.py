"""The HMP command table: data, like QEMU's ``hmp-commands.hx`` / ``hmp-commands-info.hx``.

Each command has QEMU's ``args_type`` (what the argument parser reads), ``params`` and
``help`` (what ``help`` prints as ``name params -- help``) and a handler
``handler(ctx, **args) -> None`` (the parsed arguments by name) that prints through ``ctx.print``. Aliases are spelled
``name|alias`` as in QEMU.

Each command also says, where it is registered, who runs it when sevmon is attached to a
QEMU (``attached``): sevmon (:data:`OWN`), QEMU (:data:`QEMU`), or QEMU unless debugging is
refused because QEMU would read guest memory for it (:data:`QEMU_READS_MEMORY`). It may be a
function of the parsed arguments (``x /i`` is QEMU's: sevmon has no disassembler). The
attached monitor is built from these declarations, so a new memory command cannot silently
go to QEMU: the commands that touch guest memory must declare one (see ``sevmon.attach.commands``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

OWN = "own"                              # attached: sevmon runs it (it reads memory through sevmon's debug path)
QEMU = "qemu"                            # attached: QEMU runs it as it came
QEMU_READS_MEMORY = "qemu-reads-memory"  # attached: QEMU runs it, and reads guest memory: refused when debugging is

WhenAttached = str | Callable[[dict], str] | None  # one of the above, or of the parsed arguments; None: undeclared


@dataclass
class HmpCommand:
    name: str                       # "stop|s"
    args_type: str                  # "fmt:/,addr:l"
    params: str                     # "/fmt addr"
    help: str
    handler: Callable | None = None
    sub_table: list[HmpCommand] | None = None
    attached: WhenAttached = None

    def when_attached(self, args: dict) -> str | None:
        """Who runs this command, with these arguments, when sevmon is attached to a QEMU."""
        return self.attached(args) if callable(self.attached) else self.attached

    @property
    def names(self) -> list[str]:
        return self.name.split("|")

    def matches(self, word: str) -> bool:
        return word in self.names


@dataclass
class CommandTable:
    """A sorted table (QEMU sorts its tables alphabetically for ``help``)."""

    commands: list[HmpCommand] = field(default_factory=list)

    def add(self, cmd: HmpCommand) -> HmpCommand:
        self.commands.append(cmd)
        self.commands.sort(key=lambda c: c.name)
        return cmd

    def find(self, word: str) -> HmpCommand | None:
        for c in self.commands:
            if c.matches(word):
                return c
        return None

    def command(self, name: str, args_type: str = "", params: str = "", help: str = "", *,
                attached: WhenAttached = None):
        """Decorator: register ``fn`` as the handler of a new command (``attached``: who runs it when sevmon is
        attached to a QEMU, see the module's docstring)."""
        def deco(fn):
            self.add(HmpCommand(name, args_type, params, help, fn, attached=attached))
            return fn
        return deco
