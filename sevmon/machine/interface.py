"""The machine interface: what every front end and every command may ask of a VM.

Two kinds of machine implement it: the local model (:class:`sevmon.machine.local.LocalMachine`: the built-in guest,
an ELF core, a raw image, a migration target) and an attached live QEMU (:class:`sevmon.attach.machine.AttachedMachine`). The commands layer talks only to :class:`Machine`;
it never knows which kind it has.

Run state follows QEMU's ``RunState`` names and is changed only through :meth:`RunStateMachine.transition`, which
refuses transitions QEMU would not make (``runstate_transitions_def``), in the spirit of qemu.qmp's ``Runstate``
and ``@require``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from sevmon.x86.cpu import CpuState

if TYPE_CHECKING:
    from sevmon.debug import MachineMemory
    from sevmon.sev.vm import SevVm

EventListener = Callable[[str, dict | None], None]


class RunState(enum.Enum):
    """QEMU's run states (``qapi/run-state.json``), as ``query-status`` reports them."""

    PRELAUNCH = "prelaunch"
    RUNNING = "running"
    PAUSED = "paused"
    SAVE_VM = "save-vm"
    INMIGRATE = "inmigrate"
    FINISH_MIGRATE = "finish-migrate"
    POSTMIGRATE = "postmigrate"
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal-error"


_S = RunState
#: The transitions a machine may make (a subset of QEMU's ``runstate_transitions_def``).
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    _S.PRELAUNCH: frozenset({_S.RUNNING, _S.PAUSED, _S.INMIGRATE, _S.SHUTDOWN}),
    _S.RUNNING: frozenset({_S.PAUSED, _S.SAVE_VM, _S.FINISH_MIGRATE, _S.SHUTDOWN, _S.INTERNAL_ERROR}),
    _S.PAUSED: frozenset({_S.RUNNING, _S.SAVE_VM, _S.FINISH_MIGRATE, _S.POSTMIGRATE, _S.SHUTDOWN}),
    _S.SAVE_VM: frozenset({_S.RUNNING, _S.PAUSED}),
    _S.INMIGRATE: frozenset({_S.RUNNING, _S.PAUSED, _S.SHUTDOWN, _S.INTERNAL_ERROR}),
    _S.FINISH_MIGRATE: frozenset({_S.RUNNING, _S.PAUSED, _S.POSTMIGRATE}),
    _S.POSTMIGRATE: frozenset({_S.RUNNING, _S.PAUSED, _S.SHUTDOWN}),
    _S.SHUTDOWN: frozenset({_S.RUNNING, _S.PAUSED}),
    _S.INTERNAL_ERROR: frozenset({_S.RUNNING, _S.PAUSED}),
}


class StateError(RuntimeError):
    """A run-state transition (or an operation) that the current state does not allow."""


class RunStateMachine:
    """Run state plus the events that announce it: the part every kind of machine shares."""

    def __init__(self, state: RunState):
        self._state = state
        self._listeners: list[EventListener] = []

    @property
    def state(self) -> RunState:
        return self._state

    @property
    def running(self) -> bool:
        return self._state is RunState.RUNNING

    def transition(self, new: RunState) -> None:
        """Move to ``new``; StateError if QEMU would not make this transition. No event: callers emit
        QEMU's (STOP, RESUME...) where QEMU does, since not every transition has one."""
        if new is self._state:
            return
        if new not in TRANSITIONS[self._state]:
            raise StateError(f"invalid runstate transition: '{self._state.value}' -> '{new.value}'")
        self._state = new

    def follow(self, new: RunState) -> None:
        """Record a state that another authority already changed (an attached QEMU's events): no guard, since
        QEMU applied its own rules, and sevmon must never disagree with what QEMU reports."""
        self._state = new

    def add_listener(self, fn: EventListener) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: EventListener) -> None:
        """A front end that goes away (a gdb session) stops listening."""
        if fn in self._listeners:
            self._listeners.remove(fn)

    def emit(self, event: str, data: dict | None = None, timestamp: dict | None = None) -> None:
        """Tell every listener; ``timestamp`` is QEMU's own for an event relayed from QEMU."""
        for fn in list(self._listeners):
            if timestamp is None:
                fn(event, data)
            else:
                fn(event, data, timestamp=timestamp)


@dataclass(frozen=True)
class Capabilities:
    """What a machine can do beyond reading memory; front ends ask before they offer a feature."""

    run_guest: bool = False      #: it has guest execution that the monitor schedules (the built-in workload)
    step: bool = False           #: single-step and breakpoints
    #: why not, in the words gdb's user reads after ``stepi``
    no_step_reason: str = "this guest executes no instructions"
    migrate: bool = False        #: SEND/RECEIVE migration
    write_memory: bool = True    #: debug writes (DBG_ENCRYPT on SEV)
    write_registers: bool = True #: vCPU register writes stick (an attached QEMU has no command for them)
    #: the daemon ends with the machine's SHUTDOWN; an attached QEMU relays its SHUTDOWN and the daemon ends when
    #: QEMU closes the link, so that QEMU's last replies and events still reach every client
    ends_with_shutdown: bool = True


@dataclass
class MachineConfig:
    """Facts the ``info``/``query`` commands report about the machine."""

    kvm_enabled: bool = False      # sevmon's model is not KVM-accelerated: TCG-like answers
    kvm_present: bool = True       # KVM "compiled in": info kvm prints enabled/disabled
    target: str = "x86_64"
    source: str = "builtin"        # builtin | core | raw
    debug_policy: bool = True      # the security-policy object: may debug access happen at all
    memory_encryption: bool = False  # the guest's memory is encrypted (info kvm's "memory encryption:" line)
    ovmf_table: dict = field(default_factory=dict)  # pflash unit 0's OVMF footer table (the launch secret's area)


@runtime_checkable
class Machine(Protocol):
    """A VM as the monitor sees it. Methods run on the machine thread (:mod:`sevmon.machine.runner`).

    ``memory`` is the debug-access layer (:class:`sevmon.debug.MachineMemory`, implemented by
    :class:`sevmon.debug.access.DebugMemory`): the only way to guest memory. ``sev`` is the SEV guest
    (:class:`sevmon.sev.vm.SevVm`, or its :class:`~sevmon.sev.mirror.MirrorSev` when attached) or None. ``ram_runs`` lists the guest-physical RAM
    as ``(first frame, count)`` runs (what a dump covers). ``cpus`` may hold vCPUs whose registers are unknown
    (``CpuState.registers_known`` False, an SEV-ES guest): every register read of them raises
    :class:`sevmon.x86.cpu.RegistersUnavailable`, and a walk must take its root from elsewhere.
    """

    config: MachineConfig
    capabilities: Capabilities
    cpus: list[CpuState]
    memory: MachineMemory
    sev: SevVm | None
    reset_required: bool

    @property
    def state(self) -> RunState: ...

    @property
    def running(self) -> bool: ...

    def transition(self, new: RunState) -> None: ...

    def add_listener(self, fn: EventListener) -> None: ...

    def remove_listener(self, fn: EventListener) -> None: ...

    def emit(self, event: str, data: dict | None = None) -> None: ...

    def ram_runs(self) -> list[tuple[int, int]]: ...

    def stop(self) -> bool:
        """Pause the guest; True when it was running (as its owner knew it: an attached QEMU is asked, since its
        STOP from another monitor may still be on the way)."""

    def cont(self) -> None: ...

    def system_reset(self) -> None: ...

    def system_powerdown(self) -> None: ...

    def quit(self, reason: str = "host-qmp-quit") -> None: ...

    def begin_command(self) -> None:
        """Before each monitor command: make the debug cache coherent with what the guest did meanwhile."""

    def run_guest(self) -> None:
        """Give a running guest one time slice (machines without ``capabilities.run_guest`` do nothing)."""
