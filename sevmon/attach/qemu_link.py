"""The QEMU link: the seam between an attached machine and the QEMU it serves.

What :class:`sevmon.attach.machine.AttachedMachine`, the forwarding of QEMU's own commands and the attach server
ask of the running QEMU's monitor, and nothing more. :class:`sevmon.attach.link.QemuLink` implements it over
qemu.qmp, on QEMU's own QMP socket or on a proxy's (``--qemu-pid``; libvirt's ``virt-qemu-qmp-proxy`` for
``--libvirt``, :mod:`sevmon.attach.libvirt`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class QemuMonitorLink(Protocol):
    pid: int | None                       #: QEMU's process (its RAM backend and SEV fds are reached through it)
    version: dict | None                  #: QEMU's greeting version (sevmon's own greeting carries it)
    loop: asyncio.AbstractEventLoop | None
    on_event: Callable[[dict], None] | None  #: QEMU's events, relayed in order
    closed: asyncio.Event                 #: QEMU closed the monitor (quit) or the socket was lost
    detach: asyncio.Event                 #: sevmon was told to stop: QEMU keeps running
    proxied: bool                         #: behind a proxy: events and replies travel apart
    on_shutdown_seen: Callable[[], bool]  #: has QEMU's SHUTDOWN reached sevmon's clients? (a proxy's link
                                          #: closes once it has, or after a grace)

    async def connect(self) -> None: ...

    async def disconnect(self) -> None: ...

    def drain(self) -> None: ...

    async def raw(self, msg: dict) -> dict: ...

    async def execute(self, name: str, arguments: dict | None = None) -> Any: ...

    async def hmp(self, line: str, cpu_index: int | None = None) -> str: ...

    def call_sync(self, coro: Coroutine) -> Any: ...
