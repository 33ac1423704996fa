"""The HMP command table: data, like QEMU's ``hmp-commands.hx`` / ``hmp-commands-info.hx``.

Each command has QEMU's ``args_type`` (what the argument parser reads), ``params`` and
``help`` (what ``help`` prints as ``name params -- help``) and a handler
``handler(ctx, **args) -> None`` (the parsed arguments by name) that prints through ``ctx.print``. Aliases are spelled
``name|alias`` as in QEMU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class HmpCommand:
    name: str                       # "stop|s"
    args_type: str                  # "fmt:/,addr:l"
    params: str                     # "/fmt addr"
    help: str
    handler: Callable | None = None
    sub_table: list[HmpCommand] | None = None

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

    def command(self, name: str, args_type: str = "", params: str = "", help: str = ""):
        """Decorator: register ``fn`` as the handler of a new command."""
        def deco(fn):
            self.add(HmpCommand(name, args_type, params, help, fn))
            return fn
        return deco
