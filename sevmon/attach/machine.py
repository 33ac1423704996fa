"""``AttachedMachine``: a running QEMU as a :class:`sevmon.machine.interface.Machine`, so the memory commands
run on it unchanged.

Coherence: QEMU runs the guest between (and during) commands. The run state follows QEMU's
events (STOP, RESUME; query-status at attach). A command syncs with QEMU only when it needs
to, at its first use of registers (``cpus[i]``): a command that needs none (``xp``,
``pmemsave``, ``info sev-debug``) makes no trip to QEMU and reads RAM as it is now, past the
page cache. The sync: a guest that is running, or ran (RESUME) or was reset since the last
sync, starts from an empty page cache and fresh registers (``info registers``, whose reply
also brings in every event QEMU sent before it); a guest that seems to have stayed paused
costs one ``query-status``, far cheaper than ``info registers``: QEMU sends events and
replies in order on the one socket, so once that reply is in, a RESUME sent by any other
client's ``cont`` (libvirt's on QEMU's other monitor too) has been seen, and the cache and
registers are dropped. Behind a proxy (``--libvirt``, ``--qemu-pid``) events and replies
travel apart, so there every command that needs registers starts cold.
"""

from __future__ import annotations

from sevmon.attach.info_registers_parser import parse_info_registers
from sevmon.attach.qemu_link import QemuMonitorLink
from sevmon.machine.interface import Capabilities, MachineConfig, RunState, RunStateMachine
from sevmon.sev.abi import Policy
from sevmon.x86.cpu import QEMU_DUMP_STALE, CpuState
from sevmon.x86.vmcoreinfo import KernelCache

_INVALIDATING = ("RESUME", "RESET", "SHUTDOWN")


class LiveCpus:
    """The vCPUs of QEMU, registers read with ``info registers`` on first use after a sync that dropped them."""

    def __init__(self, link: QemuMonitorLink, count: int, sync=lambda: None, *, encrypted: bool = False):
        """``encrypted``: an SEV-ES guest, whose registers QEMU cannot read (it prints its stale reset state):
        never asked, never used."""
        self.encrypted = encrypted
        self._link = link
        self._count = count
        self._fresh: dict[int, CpuState] = {}
        self._sync = sync
        self.last_used = 0

    def forget(self) -> None:
        self._fresh.clear()

    def fetch(self, i: int) -> str:
        """QEMU's ``info registers`` for vCPU ``i``, once every event QEMU sent before it is taken in."""
        async def regs():
            text = await self._link.hmp("info registers", i)
            self._link.drain()
            return text
        return self._link.call_sync(regs())

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> CpuState:
        if not -self._count <= i < self._count:
            raise IndexError(i)
        i %= self._count
        self.last_used = i
        self._sync()
        if self.encrypted:
            return CpuState(index=i, unavailable=QEMU_DUMP_STALE)
        cpu = self._fresh.get(i)
        if cpu is None:
            cpu = self._fresh[i] = parse_info_registers(self.fetch(i), i)
        return cpu

    def __iter__(self):
        return (self[i] for i in range(self._count))


class AttachedMachine(RunStateMachine):
    """What sevmon monitors when attached: QEMU's guest, memory through DebugMemory."""

    # QEMU's SHUTDOWN is relayed and QEMU closes the link; registers are QEMU's, read fresh, never written
    capabilities = Capabilities(ends_with_shutdown=False, write_registers=False,
                                no_step_reason="QEMU runs this guest, and QEMU's monitor has no command to "
                                "single-step it (use QEMU's own -gdb for stepping)")

    def __init__(self, link: QemuMonitorLink, ram, memory, cpu_count: int, status: str, *, kvm: dict | None = None,
                 sev=None, memory_encryption: bool = False):
        """``sev``: the live SEV guest as sevmon reaches it (a mirror VM, sevmon.sev.mirror), or None."""
        super().__init__(RunState(status) if status in RunState._value2member_map_ else RunState.PAUSED)
        self.link = link
        self.sev = sev
        self.ram = ram
        self.memory = memory
        #: SEV-ES (query-sev policy bit 2): the vCPUs' state is in encrypted VMSAs; QEMU's dump of it is stale
        self.registers_encrypted = sev is not None and bool(sev.policy & Policy.ES)
        self.cpus = LiveCpus(link, cpu_count, self._sync, encrypted=self.registers_encrypted)
        self._synced = False
        memory.coherent = lambda: self._synced  # before a sync the page cache may be stale: RAM as it is
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

    def stop(self) -> bool:
        """QEMU stops the guest (dump-guest-memory does this); STOP comes back as an event. Whether it was running is
        QEMU's answer, not the events seen so far: another client's ``stop`` may have paused it a moment ago."""
        async def stop_from():
            st = await self.link.execute("query-status")
            await self.link.execute("stop")
            return st
        was = bool(self.link.call_sync(stop_from()).get("running"))
        self.follow(RunState.PAUSED)
        return was

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
        """On the machine thread, before each owned command: nothing yet (see ``_sync``)."""
        self._synced = False

    def _sync(self) -> None:
        """Once per command, at its first use of registers: make registers and page cache current."""
        if self._synced:
            return
        self._synced = True
        if self.link.proxied:
            # behind a proxy (libvirt's) events and replies travel apart: no reply proves that a RESUME sent
            # before it has arrived (nor do registers: an idle guest halts again where it halted), so every
            # command starts from an empty cache and fresh registers
            self._dirty = True
        elif not (self.running or self._dirty):
            async def status():
                st = await self.link.execute("query-status")
                self.link.drain()  # events QEMU sent before that reply
                return st
            if self.link.call_sync(status()).get("running") and not self.running:
                self.follow(RunState.RUNNING)
        if self.running or self._dirty:
            self.memory.invalidate()
            self.cpus.forget()
        self._dirty = self.running

    def run_guest(self) -> None:
        pass
