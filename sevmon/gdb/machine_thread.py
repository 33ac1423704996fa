"""The one place the gdb stub hands work to the machine thread.

Every guest access (memory, registers, run state, HMP lines) runs exactly as a QMP or
HMP command does: on the machine thread (``executor``), under the big lock, after
``begin_command()`` (a running guest gets its time slice and the page cache starts empty;
a paused guest keeps its cache, so a page gdb reads twice costs one round trip).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def on_machine(machine, executor, fn: Callable[[], T]) -> T:
    def run() -> T:
        with machine.lock:
            machine.begin_command()
            return fn()

    return await asyncio.get_running_loop().run_in_executor(executor, run)
