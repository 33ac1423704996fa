"""The local model: a VM whose memory sevmon holds itself (the built-in guest, an ELF core, a raw image).

It implements :class:`sevmon.machine.interface.Machine`. It knows nothing of QMP or HMP: it changes state and emits
events (name, data) to whoever listens. Memory access for the monitor goes through ``memory`` (the debug-access
layer), never through ``ram`` directly.

The first transition to running finishes the SEV launch (LAUNCH_FINISH, as QEMU does) and boots the built-in guest;
under ``-S`` that is the first ``cont``. A running built-in guest gets time slices between commands, on the
machine thread, so anything cached may be stale after one: the cache is dropped whenever the guest ran.
"""

from __future__ import annotations

from typing import Protocol

from sevmon.machine.interface import Capabilities, MachineConfig, RunState, RunStateMachine
from sevmon.memory.ram import RAM
from sevmon.x86.cpu import CpuState
from sevmon.x86.vmcoreinfo import KernelCache


class GuestProgram(Protocol):
    """What runs inside a model guest (the built-in guest's OS): it boots on the first run and then works."""

    stepping: bool  #: it changes memory while running (a workload), so it needs time slices

    def boot(self) -> CpuState: ...

    def step(self) -> None: ...

    def reset(self) -> None: ...


class LocalMachine(RunStateMachine):
    """Run state, events and the guest's parts, all held locally."""

    def __init__(self, ram: RAM, cpus: list[CpuState], memory, *, config: MachineConfig | None = None,
                 sev=None, program: GuestProgram | None = None, prelaunch: bool = False, running: bool = False):
        super().__init__(RunState.PRELAUNCH)
        self.ram = ram
        self.cpus = cpus
        self.memory = memory
        self.config = config or MachineConfig()
        self.sev = sev                   # sevmon.sev.vm.SevVm or None
        self.program = program
        self.capabilities = Capabilities(run_guest=program is not None and program.stepping, migrate=sev is not None)
        self.reset_required = False
        self.kernel_cache = KernelCache()  # the guest's Linux (VMCOREINFO), while it stays the same kernel
        self._launched = False
        if not prelaunch:
            self._first_run()
            self.transition(RunState.RUNNING if running else RunState.PAUSED)

    def ram_runs(self) -> list[tuple[int, int]]:
        return list(self.ram.runs())

    # -- run state (QEMU's semantics: events only on real transitions) --------------------
    def stop(self) -> bool:
        if not self.running:
            return False
        self.transition(RunState.PAUSED)
        self._invalidate()
        self.emit("STOP")
        return True

    def cont(self) -> None:
        if not self.running:
            self._first_run()
            self.transition(RunState.RUNNING)
            self._invalidate()
            self.kernel_cache.forget()  # a guest that runs may boot (or replace) its kernel
            self.emit("RESUME")

    def system_reset(self) -> None:
        if self.program is not None and self._launched:
            self.program.reset()
        self._invalidate()
        self.kernel_cache.forget()
        self.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    def system_powerdown(self) -> None:
        self.emit("POWERDOWN")

    def quit(self, reason: str = "host-qmp-quit") -> None:
        self.emit("SHUTDOWN", {"guest": False, "reason": reason})

    # -- guest execution -----------------------------------------------------------------
    def run_guest(self) -> None:
        """Let a running guest run a slice (between monitor commands): its memory may have
        changed, so nothing cached stays valid."""
        if self.running:
            if self.capabilities.run_guest:
                self.program.step()
            self._invalidate()

    def begin_command(self) -> None:
        """Called before each monitor command: while running, each command starts from an
        empty cache (consistent within the command, never stale across commands)."""
        self.run_guest()

    def _first_run(self) -> None:
        """LAUNCH_FINISH, then the guest program boots (builds its tables through its own key)."""
        if self._launched:
            return
        self._launched = True
        if self.sev is not None and self.sev.state_name == "launch-secret":
            self.sev.finish()
        if self.program is not None:
            regs = self.program.boot().regs
            if self.cpus[0].registers_known:  # an SEV-ES vCPU's state stays in its VMSA
                self.cpus[0].regs = regs

    def _invalidate(self) -> None:
        self.memory.invalidate()
