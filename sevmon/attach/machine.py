"""``AttachedMachine``: a running QEMU as a :class:`sevmon.machine.interface.Machine`, so the memory commands
run on it unchanged.

Coherence: QEMU runs the guest between (and during) commands. The run state follows QEMU's
events (STOP, RESUME; query-status at attach). ``begin_command`` makes one trip to QEMU
and takes in every event QEMU sent before its reply: a guest that is running, or ran
(RESUME) or was reset since the last command, starts the command with an empty page
cache; a guest that stayed paused keeps it. Registers are fetched fresh for each command,
for the vCPU the command uses.
"""

from __future__ import annotations

from sevmon.attach.info_registers_parser import parse_info_registers
from sevmon.attach.qemu_link import QemuMonitorLink
from sevmon.machine.interface import Capabilities, MachineConfig, RunState, RunStateMachine
from sevmon.x86.cpu import CpuState
from sevmon.x86.vmcoreinfo import KernelCache

_INVALIDATING = ("RESUME", "RESET", "SHUTDOWN")


class LiveCpus:
    """The vCPUs of QEMU, registers read with ``info registers`` on first use per command."""

    def __init__(self, link: QemuMonitorLink, count: int):
        self._link = link
        self._count = count
        self._fresh: dict[int, CpuState] = {}
        self.last_used = 0  # begin_command prefetches this vCPU's registers with the run state

    def forget(self) -> None:
        self._fresh.clear()

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> CpuState:
        if not -self._count <= i < self._count:
            raise IndexError(i)
        i %= self._count
        self.last_used = i
        cpu = self._fresh.get(i)
        if cpu is None:
            text = self._link.call_sync(self._link.hmp("info registers", i))
            cpu = self._fresh[i] = parse_info_registers(text, i)
        return cpu

    def __iter__(self):
        return (self[i] for i in range(self._count))


class AttachedMachine(RunStateMachine):
    """What sevmon monitors when attached: QEMU's guest, memory through DebugMemory."""

    # QEMU's SHUTDOWN is relayed and QEMU closes the link; registers are QEMU's, read fresh, never written
    capabilities = Capabilities(ends_with_shutdown=False, write_registers=False)

    def __init__(self, link: QemuMonitorLink, ram, memory, cpu_count: int, status: str, *, kvm: dict | None = None,
                 sev=None, memory_encryption: bool = False):
        """``sev``: the live SEV guest as sevmon reaches it (a mirror VM, sevmon.sev.mirror), or None."""
        super().__init__(RunState(status) if status in RunState._value2member_map_ else RunState.PAUSED)
        self.link = link
        self.sev = sev
        self.ram = ram
        self.memory = memory
        self.cpus = LiveCpus(link, cpu_count)
        self.config = MachineConfig(kvm_enabled=bool(kvm and kvm.get("enabled")),
                                    kvm_present=bool(kvm and kvm.get("present")), source="attach",
                                    memory_encryption=memory_encryption)
        self.reset_required = False
        self.kernel_cache = KernelCache()
        self.shutdown_seen = False
        self._dirty = self.running
        link.on_event = self._on_qemu_event

    def ram_runs(self) -> list[tuple[int, int]]:
        return list(self.ram.runs())

    def _on_qemu_event(self, msg: dict) -> None:
        """On the event loop: track run state, then relay QEMU's event to every client."""
        name = msg.get("event")
        if name == "STOP":
            self.follow(RunState.PAUSED)
        elif name == "RESUME":
            self.follow(RunState.RUNNING)
        if name in _INVALIDATING:
            self._dirty = True
        if name == "SHUTDOWN":
            self.shutdown_seen = True
        if name in ("RESET", "RESUME"):
            self.kernel_cache.forget()  # a reset or running guest may boot another kernel (another KASLR offset)
        self.emit(name, msg.get("data"), timestamp=msg.get("timestamp"))

    def _call(self, name: str, args: dict | None = None):
        return self.link.call_sync(self.link.execute(name, args))

    def stop(self) -> None:
        """QEMU stops the guest (dump-guest-memory does this); STOP comes back as an event."""
        self._call("stop")
        self.follow(RunState.PAUSED)

    def cont(self) -> None:
        self._call("cont")
        self.follow(RunState.RUNNING)
        self._dirty = True

    def transition(self, new: RunState) -> None:
        """QEMU owns the run state and enforces its rules; a state sevmon enters on its own (a dump's save-vm)
        is recorded here only (``stop``/``cont`` are what reach QEMU)."""
        self.follow(new)

    def system_reset(self) -> None:
        self._call("system_reset")

    def system_powerdown(self) -> None:
        self._call("system_powerdown")

    def quit(self, reason: str = "host-signal") -> None:
        """sevmon is told to stop (a signal): detach and leave QEMU running."""
        if self.link.loop is not None:
            self.link.loop.call_soon_threadsafe(self.link.detach.set)

    def begin_command(self) -> None:
        """On the machine thread, before each owned command: one trip to QEMU, for the
        registers of the vCPU the last command used. QEMU sends events and replies in
        order on the one socket, so once that reply is in, every STOP/RESUME/RESET sent
        before it has been taken in: the run state is as current as a query-status."""
        idx = self.cpus.last_used

        async def sync():
            regs = await self.link.hmp("info registers", idx)
            self.link.drain()  # events QEMU sent before that reply
            return regs
        regs = self.link.call_sync(sync())
        self.cpus.forget()
        self.cpus._fresh[idx] = parse_info_registers(regs, idx)
        if self.running or self._dirty:
            self.memory.invalidate()
        self._dirty = self.running

    def run_guest(self) -> None:
        pass
