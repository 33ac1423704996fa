"""gdb on vCPUs whose registers no one can read (SEV-ES: encrypted in the VMSA; a raw image without CPU state).

RSP's answer for an unknown register is ``xx`` per byte, and gdb prints ``<unavailable>`` for it. The PC is
the difficulty: gdb 13 takes an ordinary stop reply (``T05thread:01;``) through infrun's
``handle_signal_stop``, whose first act is ``regcache_read_pc``; with the PC unavailable that throws
``PC register is not available`` and ``target remote`` pops the target, so no memory can be read at all.
Non-stop mode is no way out: a thread reported stopped at connect goes through
``print_one_stopped_thread`` (``get_frame_pc``: ``PC not available``, target popped again), and threads left
running answer every register question with ``Selected thread is running.``, never ``<unavailable>``.

What gdb does take without a PC is the stop reply's ``library`` reason: it is ``TARGET_WAITKIND_LOADED``,
and while ``target remote`` sets up (``stop_soon == STOP_QUIETLY_REMOTE``) infrun's ``handle_inferior_event``
stops there "quietly", reading no register; ``post_create_inferior`` tolerates the unavailable PC, and
frames built on it print as ``#0  <unavailable> in ?? ()``. So the stub answers ``?`` that way for such a
vCPU, and only for such a vCPU: every other guest keeps the plain stop reply. It is the reply to ``?`` only:
a ``library`` stop at any other time (``stop_soon == NO_STOP_QUIETLY``) makes gdb resume the target. gdb then shows
``<unavailable>`` for every register, reads memory through the kernel's own page tables, and refuses
``continue``/``stepi`` itself (``proceed`` needs the PC: ``PC register is not available``) without sending
anything, so the guest runs only when the monitor says so (``monitor cont``/``stop``).
"""

from __future__ import annotations

from sevmon.gdb.packets import E_FAULT, E_INVAL
from sevmon.gdb.target import Target
from sevmon.x86.cpu import CpuState

SIGTRAP = 5


def attach_stop(cpu: CpuState, tid: str) -> str:
    """The reply to ``?`` (the stop gdb finds when it connects), decided here for every kind of guest: a plain
    stop, or, when the vCPU's registers cannot be read, the quiet one gdb takes without a PC."""
    if cpu.registers_known:
        return f"T{SIGTRAP:02x}thread:{tid};"
    return f"T{SIGTRAP:02x}library:;thread:{tid};"


def unavailable(target: Target, cmd: bytes, regnum: int | None) -> str:
    """``g``/``p`` of a vCPU whose registers no one can know: ``xx`` per byte, so gdb prints
    ``<unavailable>`` instead of a value (never a stale or made-up one); ``G``/``P`` are refused."""
    if cmd == b"g":
        return "xx" * sum(target.size(n) for n in range(len(target.regs)))
    if cmd == b"p" and regnum is not None:
        return E_FAULT if regnum >= len(target.regs) else "xx" * target.size(regnum)
    return E_INVAL
