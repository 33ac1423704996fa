"""Progress for long monitor work: ``dump-guest-memory`` typed in the shell.

The shell sends the HMP line with ``-d`` (detach) so the daemon answers at once, then polls
``query-dump`` ({"status", "completed", "total"}) and redraws one bar line until the status
is ``completed`` or ``failed``. :func:`with_detach` puts ``-d`` where QEMU's argument parser
expects it: flags are read in ``args_type`` order (``-p`` before ``-d`` before the format
flags), so ``dump-guest-memory -d -p f`` would not parse while ``-p -d f`` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

__all__ = ["DUMP_COMMAND", "format_bar", "is_dump_line", "watch_dump", "with_detach"]

DUMP_COMMAND = "dump-guest-memory"
POLL_SECONDS = 0.1
BAR_WIDTH = 30


def is_dump_line(line: str) -> bool:
    words = line.split(None, 1)
    return bool(words) and words[0] == DUMP_COMMAND


def with_detach(line: str) -> str:
    """``line`` (a dump-guest-memory command) with the ``-d`` flag, in QEMU's flag order."""
    head, _, rest = line.strip().partition(" ")
    words = rest.split(" ")
    flags = []
    while words and (words[0] == "" or (words[0].startswith("-") and len(words[0]) == 2)):
        w = words.pop(0)
        if w:
            flags.append(w)
    if "-d" in flags:
        return line
    order = ["-p", "-d"] if "-p" in flags else ["-d"]
    flags = order + [f for f in flags if f != "-p"]
    return " ".join([head, *flags, *words]).rstrip()


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f}"


def format_bar(completed: int, total: int, width: int = BAR_WIDTH) -> str:
    """``dump-guest-memory [#####.....]  50%  128.0/256.0 MiB``"""
    frac = min(1.0, completed / total) if total > 0 else 0.0
    filled = int(frac * width)
    return (f"{DUMP_COMMAND} [{'#' * filled}{'.' * (width - filled)}] {int(frac * 100):3d}%"
            f"  {_mib(completed)}/{_mib(total)} MiB")


async def watch_dump(query: Callable[[], Awaitable[dict]], draw: Callable[[str], None]) -> dict:
    """Poll ``query`` (query-dump) and ``draw`` a bar until the dump ends; return the last reply.

    Stops on ``completed``, ``failed`` or ``none`` (no dump: the command was refused).
    """
    while True:
        st = await query()
        status = st.get("status")
        completed, total = int(st.get("completed", 0)), int(st.get("total", 0))
        if status in ("active", "completed"):
            draw(format_bar(total if status == "completed" else completed, total))
        if status != "active":
            return st
        await asyncio.sleep(POLL_SECONDS)
