"""Tab completion for the shell, learnt from the daemon itself.

At connect time the shell asks the daemon for ``help`` and ``info`` and parses QEMU's
``name|alias params -- text`` lines (:func:`parse_help`); nothing here is a copy of the
command table. :class:`MonitorCompleter` then completes

* the command name (first word) and the argument of ``help``;
* the ``info`` subcommand (second word after ``info``);
* register names after ``$`` anywhere in an expression (``x /4gx $rs<Tab>``);
* file paths for the file argument of a command whose ``params`` name one
  (``memsave addr size file``, ``dump-guest-memory [-p] ... filename [begin length]``).

Like QEMU's readline, a completed command name is followed by a space (a register is not:
the expression may go on, ``$rsp+8``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document

from sevmon.hmp.expr_registers import REGISTER_NAMES

__all__ = ["HelpEntry", "MonitorCompleter", "file_arg_index", "parse_help"]

# Where the file argument sits (0-based, counting positional arguments only) when the
# daemon's help line does not name it; used only as a fallback.
_FILE_ARG_FALLBACK = {"memsave": 2, "pmemsave": 2, "dump-guest-memory": 0}
_FILE_WORDS = ("file", "filename")
_REG_FRAGMENT = re.compile(r"\$([A-Za-z0-9_.]*)$")


@dataclass(frozen=True)
class HelpEntry:
    """One ``help`` line: ``names`` (name and aliases), ``params`` and the help text."""

    names: tuple[str, ...]
    params: str
    text: str

    @property
    def name(self) -> str:
        return self.names[0]


def parse_help(text: str, prefix: str = "") -> list[HelpEntry]:
    """Parse QEMU ``help`` output (``name|alias params -- text`` per line).

    ``prefix`` is stripped from each line first (``"info "`` for the ``info`` list).
    Lines that do not have the shape (an ``unknown command`` reply, blank lines, indented
    continuation lines) are skipped.
    """
    out = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line or line[0].isspace():
            continue  # blank, or a continuation line of a long help text (dump-guest-memory's)
        if prefix:
            if not line.startswith(prefix):
                continue
            line = line[len(prefix):]
        head, sep, help_text = line.partition(" -- ")
        if not sep:
            continue
        name, _, params = head.strip().partition(" ")
        if not name or name.startswith("unknown"):
            continue
        out.append(HelpEntry(tuple(filter(None, name.split("|"))), params.strip(), help_text.strip()))
    return out


def file_arg_index(entry: HelpEntry) -> int | None:
    """Index of the file argument among the positional arguments, from ``params``."""
    positional = []
    for tok in entry.params.split():
        if tok.startswith("[-") or tok.startswith("-"):
            continue  # flags such as [-p] [-z|-l|-s|-w]
        positional.append(tok.strip("[]"))
    for i, tok in enumerate(positional):
        if tok in _FILE_WORDS:
            return i
    return _FILE_ARG_FALLBACK.get(entry.name)


class MonitorCompleter(Completer):
    """Completes HMP lines from the daemon's ``help`` and ``info`` tables."""

    def __init__(self, commands: Iterable[HelpEntry], info: Iterable[HelpEntry],
                 registers: Iterable[str] = REGISTER_NAMES):
        self.commands = list(commands)
        self.info = list(info)
        self.registers = sorted(registers)
        self._by_name = {n: e for e in self.commands for n in e.names}
        self._paths = PathCompleter(expanduser=True)

    # -- the names offered ---------------------------------------------------------------
    @staticmethod
    def _names(entries: list[HelpEntry]) -> list[str]:
        return sorted({n for e in entries for n in e.names})

    def command_names(self) -> list[str]:
        return self._names(self.commands)

    def info_names(self) -> list[str]:
        return self._names(self.info)

    # -- completion ----------------------------------------------------------------------
    def get_completions(self, document: Document, complete_event: CompleteEvent) -> Iterator[Completion]:
        before = document.text_before_cursor
        words = before.split()
        if not words or before[-1].isspace():
            words.append("")  # the cursor starts a new (empty) word
        current, done = words[-1], words[:-1]

        reg = _REG_FRAGMENT.search(current)
        if reg is not None:
            yield from _complete_words(reg.group(1), self.registers, suffix="", display_meta="register")
            return
        if not done:
            yield from _complete_words(current, self.command_names())
            return
        entry = self._by_name.get(done[0])
        if entry is None:
            return
        if entry.name == "info":
            if len(done) == 1:
                yield from _complete_words(current, self.info_names())
            return
        if entry.name == "help":
            if len(done) == 1:
                yield from _complete_words(current, self.command_names())
            elif len(done) == 2 and self._by_name.get(done[1], entry).name == "info":
                yield from _complete_words(current, self.info_names())
            return
        index = file_arg_index(entry)
        if index is None or current.startswith("-") or current.startswith('"'):
            return
        positional = [w for w in done[1:] if not w.startswith("-")]
        if len(positional) == index:
            yield from self._paths.get_completions(Document(current, len(current)), complete_event)


def _complete_words(fragment: str, names: Iterable[str], suffix: str = " ",
                    display_meta: str | None = None) -> Iterator[Completion]:
    """Names starting with ``fragment``, followed by ``suffix`` (a space, as QEMU's readline)."""
    for name in names:
        if name.startswith(fragment):
            yield Completion(name + suffix, start_position=-len(fragment), display=name, display_meta=display_meta)
