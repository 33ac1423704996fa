"""Forwarding: what sevmon does not own goes to QEMU as it came, and QEMU's reply comes back.

One mechanism for each front end:

* QMP: :class:`QmpForwarder` is the registry's ``forwarder``. Requests it ``wants`` skip
  sevmon's schema (QEMU checks them); they are sent under an id of the link's own and the
  reply (``return`` or ``error``, QEMU's class and text) goes back under the client's id.
* HMP: :class:`AttachedMonitor` runs the lines sevmon owns in its own table; any other
  line runs in QEMU through ``human-monitor-command`` (with the client's vCPU).
"""

from __future__ import annotations

import re

from sevmon.attach.errors import AttachError
from sevmon.errors import CommandError
from sevmon.hmp.monitor import HumanMonitor

_OWNED_HMP_ARGS = {"command-line", "cpu-index"}


_DISASSEMBLE = re.compile(r"\s*xp?\s*/[^\s]*i")


def owned_hmp_line(monitor, line: str) -> bool:
    """Does sevmon's own table run ``line`` (its command word, or ``info`` + its item)?
    ``x``/``xp`` with format ``i`` stay QEMU's: sevmon has no disassembler."""
    if _DISASSEMBLE.match(line):
        return False
    words, commands, p = 0, monitor.table.commands, 0
    while words < 2:
        while p < len(line) and line[p].isspace():
            p += 1
        start = p
        while p < len(line) and line[p] != "/" and not line[p].isspace():
            p += 1
        word = line[start:p]
        if not word:
            return False
        found = next((c for c in commands if c.matches(word)), None)
        if found is None:
            return False
        if found.sub_table is None:
            return True
        commands, words = found.sub_table, words + 1
    return False


class QmpForwarder:
    def __init__(self, link, registry, monitor, cpu_count: int):
        self.link = link
        self.registry = registry
        self.monitor = monitor
        self.cpu_count = cpu_count

    def wants(self, name: str, arguments) -> bool:
        if name == "human-monitor-command":
            return not self._owned_hmp(arguments)
        return name not in self.registry

    def _owned_hmp(self, arguments) -> bool:
        """Owned only when well-formed and naming one of sevmon's commands: QEMU gives
        every other human-monitor-command (its errors included) its own answer."""
        if not isinstance(arguments, dict) or not set(arguments) <= _OWNED_HMP_ARGS:
            return False
        line, cpu = arguments.get("command-line"), arguments.get("cpu-index", 0)
        if not isinstance(line, str) or type(cpu) is not int or not 0 <= cpu < self.cpu_count:
            return False
        return owned_hmp_line(self.monitor, line)

    async def forward(self, ctx, req):
        msg = {"exec-oob" if req.oob else "execute": req.name}
        if req.args:
            msg["arguments"] = req.args
        reply = await self.link.raw(msg)
        if "error" in reply:
            err = reply["error"]
            raise CommandError(err.get("desc", ""), err.get("class", "GenericError"))
        return reply.get("return")


class AttachedMonitor(HumanMonitor):
    """The human monitor of an attached sevmon: sevmon's lines here, the rest in QEMU."""

    def __init__(self, runner, table, info_table, link):
        super().__init__(runner, table, info_table)
        self.link = link

    def run(self, line: str, cpu_index: int = 0, limit: int = 8 << 20) -> str:
        if owned_hmp_line(self, line):
            return super().run(line, cpu_index, limit)
        return self.qemu(line, cpu_index)

    def qemu(self, line: str, cpu_index: int = 0) -> str:
        """QEMU's own text for ``line`` (``\n`` line ends)."""
        try:
            return self.link.call_sync(self.link.hmp(line, cpu_index))
        except AttachError as e:
            return f"Error: {e}\n"
