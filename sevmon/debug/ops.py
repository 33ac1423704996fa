"""Per-RAM-region debug ops (the seed series' ``ram_debug_ops``): how a run of guest
frames is read or written when the monitor asks.

``PlainOps`` reads RAM as stored. ``SevOps`` issues one ``KVM_SEV_DBG_DECRYPT`` ioctl per
run for private memory (and one ``DBG_ENCRYPT`` per write); shared pages (C-bit clear)
hold plaintext at rest and are read as stored. Both refuse up front when debug access is
not allowed, so no ioctl is issued and no plaintext can leave.
"""

from __future__ import annotations

from sevmon.debug.refusal import debug_refusal
from sevmon.memory.ram import PAGE_SHIFT, RAM, MemoryAccessError
from sevmon.sev.vm import SevError


class DebugError(MemoryAccessError):
    """Debug access did not happen: ``reason`` is the one sentence a monitor shows (after ``Error: ``)."""


class DebugRefused(DebugError):
    """Debug access is forbidden (guest policy NODBG, or the security policy)."""


class DebugFailed(DebugError):
    """The kernel or the firmware failed a debug request; ``reason`` is its one sentence
    (e.g. "SEV: DBG_DECRYPT failed: ... (fw error 7)"). Nothing of the request was kept."""


class PlainOps:
    """Unencrypted guest: memory is what is stored."""

    encrypted = False
    sev = None  #: the SEV guest the refusal rule asks (SevOps)

    def __init__(self, ram: RAM, *, allowed: bool = True):
        self.ram = ram
        self.allowed = allowed

    @property
    def refusal(self) -> str | None:
        """The debug-refusal rule's sentence for this guest (:mod:`sevmon.debug.refusal`), or None."""
        return debug_refusal(self.sev, security_allowed=self.allowed)

    def check(self, gpa: int) -> None:
        if self.refusal:
            raise DebugRefused(gpa, self.refusal)

    def read_run(self, gpa: int, size: int, private: bool) -> bytes:
        self.check(gpa)
        return self.ram.read(gpa, size)

    def write(self, gpa: int, data: bytes, private: bool) -> None:
        self.check(gpa)
        self._ensure_ram(gpa, len(data))
        self.ram.write(gpa, data)

    def _ensure_ram(self, gpa: int, size: int) -> None:
        for pfn in range(gpa >> PAGE_SHIFT, (gpa + size - 1 >> PAGE_SHIFT) + 1):
            if not self.ram.has(pfn):
                raise MemoryAccessError(pfn << PAGE_SHIFT)

    def stats(self) -> dict:
        return {"round-trips": 0, "firmware-calls": 0, "bytes-decrypted": 0, "bytes-encrypted": 0}


class SevOps(PlainOps):
    """SEV guest: private memory through DBG_DECRYPT / DBG_ENCRYPT via the kernel."""

    encrypted = True

    def __init__(self, ram: RAM, sev, *, allowed: bool = True):
        super().__init__(ram, allowed=allowed)
        self.sev = sev

    def read_run(self, gpa: int, size: int, private: bool) -> bytes:
        self.check(gpa)
        self._ensure_ram(gpa, size)
        if not private:
            return self.ram.read(gpa, size)
        try:
            data = self.sev.dbg_decrypt(gpa, size)
        except SevError as e:
            raise DebugFailed(gpa, str(e)) from None
        rom = self.ram.rom_in(gpa, size) if getattr(self.ram, "rom", None) else ()
        if rom:  # no key covers a ROM: its bytes at rest are its contents (QEMU's xp of 0xffff0 in prelaunch)
            data = bytearray(data)
            for at, n in rom:
                data[at - gpa:at - gpa + n] = self.ram.read(at, n)
            data = bytes(data)
        return data

    def write(self, gpa: int, data: bytes, private: bool) -> None:
        self.check(gpa)
        self._ensure_ram(gpa, len(data))
        if private:
            try:
                self.sev.dbg_encrypt(gpa, data)
            except SevError as e:
                raise DebugFailed(gpa, str(e)) from None
        else:
            self.ram.write(gpa, data)

    def stats(self) -> dict:
        s = self.sev.stats
        return {"round-trips": s.round_trips, "firmware-calls": s.firmware_calls,
                "bytes-decrypted": s.bytes_decrypted, "bytes-encrypted": s.bytes_encrypted}
