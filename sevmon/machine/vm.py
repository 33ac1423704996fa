"""The VM the monitor talks to: run state, events, vCPUs, RAM and (optionally) SEV.

This is the one object every monitor command acts on. It knows nothing of QMP or HMP:
it changes state and *emits* events (name, data) to whoever listens (the QMP server
broadcasts them to negotiated sessions). Memory access for the monitor goes through
``self.memory`` (the debug-access layer), never through ``self.ram`` directly.

Threading: commands run one at a time on the machine thread (QEMU's big lock); the
guest workload, when there is one, runs on the same thread between commands.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from sevmon.machine.cpu import CpuState
from sevmon.machine.ram import RAM

EventListener = Callable[[str, dict | None], None]


@dataclass
class MachineConfig:
    """What the guest options chose; shown by ``info``/``query`` commands."""

    kvm_enabled: bool = False      # sevmon's model is not KVM-accelerated: TCG-like answers
    kvm_present: bool = True       # KVM "compiled in": info kvm prints enabled/disabled
    target: str = "x86_64"
    source: str = "builtin"        # builtin | core | raw
    debug_policy: bool = True      # the security-policy object: may debug access happen at all
    extra: dict = field(default_factory=dict)


class Machine:
    """Run state machine + event emitter + the guest's parts."""

    def __init__(self, ram: RAM, cpus: list[CpuState], *, config: MachineConfig | None = None,
                 sev=None, running: bool = False, prelaunch: bool = False):
        self.ram = ram
        self.cpus = cpus
        self.config = config or MachineConfig()
        self.sev = sev                   # sevmon.sev.vm.SevVm or None
        self.memory = None               # debug access (sevmon.debug.access.DebugMemory), set by the builder
        self.workload = None             # optional guest activity (built-in guest), has .step() and .reset()
        self.status = "prelaunch" if prelaunch else "running" if running else "paused"
        self.reset_required = False
        self.dump = None                 # the current/last dump job (sevmon.commands.dump), for query-dump
        self.first_run = None            # under -S: what the first cont does first (LAUNCH_FINISH, boot)
        self._listeners: list[EventListener] = []
        self.lock = threading.RLock()
        self.quit_requested = threading.Event()

    # -- events --------------------------------------------------------------------------
    def add_listener(self, fn: EventListener) -> None:
        self._listeners.append(fn)

    def remove_listener(self, fn: EventListener) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def emit(self, event: str, data: dict | None = None) -> None:
        for fn in list(self._listeners):
            fn(event, data)

    # -- run state (QEMU's semantics: events only on real transitions) --------------------
    @property
    def running(self) -> bool:
        return self.status == "running"

    def stop(self) -> None:
        if self.status == "running":
            self.status = "paused"
            self._invalidate()
            self.emit("STOP")

    def cont(self) -> None:
        if self.status != "running":
            if self.first_run is not None:  # QEMU finishes the SEV launch on the first run
                start, self.first_run = self.first_run, None
                start()
            self.status = "running"
            self._invalidate()
            self.emit("RESUME")

    def system_reset(self) -> None:
        if self.workload is not None:
            self.workload.reset()
        self._invalidate()
        self.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    def system_powerdown(self) -> None:
        self.emit("POWERDOWN")

    def quit(self, reason: str = "host-qmp-quit") -> None:
        self.emit("SHUTDOWN", {"guest": False, "reason": reason})
        self.quit_requested.set()

    # -- guest execution -----------------------------------------------------------------
    def run_guest(self) -> None:
        """Let a running guest run a slice (between monitor commands): its memory may have
        changed, so nothing cached stays valid."""
        if self.status == "running":
            if self.workload is not None:
                self.workload.step()
            self._invalidate()

    def begin_command(self) -> None:
        """Called before each monitor command: while running, each command starts from an
        empty cache (consistent within the command, never stale across commands)."""
        self.run_guest()

    def _invalidate(self) -> None:
        if self.memory is not None:
            self.memory.invalidate()
