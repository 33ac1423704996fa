"""dump-guest-memory / query-dump / DUMP_COMPLETED, as QEMU 7.2's dump/dump.c behaves
(ELF, paging off), reading plaintext through the debug API so an SEV guest's dump is
usable. A detached dump runs on its own thread, taking the machine lock per chunk, and
reports progress through query-dump. It is the runner's "dump" job: the daemon cancels it on
shutdown.

A Linux guest's dump carries its VMCOREINFO as QEMU's does with ``-device vmcoreinfo`` (a ``VMCOREINFO`` note after
the vCPU notes), so ``crash`` and ``drgn -c`` open it with the kernel's debug vmlinux. QEMU copies that note with a
plain memory read, which is ciphertext under SEV; sevmon takes the text from the page the kernel keeps it in, found
and read through the debug path (:mod:`sevmon.machine.kernel_root`: the scan is paid once and cached while the guest
stays paused). No Linux found: no note, nothing made up. The vCPU notes are QEMU's where the registers are known,
none for SEV-ES. The dump of an SEV guest describes its RAM a second time at the C-bit addresses its page tables
name (:mod:`sevmon.machine.dump`: drgn takes that bit as an address bit); its bytes are the guest's, unchanged.

The core is written beside the target and renamed into place when complete (:mod:`sevmon.outfile`): a refused,
failed or cancelled dump never destroys an existing file and leaves no partial one. QEMU truncates the file first.
"""

from __future__ import annotations

import os
import threading

from sevmon.debug.ops import DebugError
from sevmon.debug.refusal import cbit_mask, machine_refusal
from sevmon.errors import CommandError
from sevmon.hmp.table import OWN, QEMU
from sevmon.machine.cbit_note import cbit_note
from sevmon.machine.dump import vmcoreinfo_note, write_core
from sevmon.machine.interface import RunState
from sevmon.machine.kernel_root import kernel_cache
from sevmon.memory.ram import PAGE_SHIFT, PAGE_SIZE
from sevmon.outfile import OutputFile, OutputFileError

UNSUPPORTED_FORMATS = ("kdump-zlib", "kdump-lzo", "kdump-snappy", "win-dmp")


class Cancelled(Exception):
    pass


class _CancellableMemory:
    """The machine's memory as the VMCOREINFO scan sees it, checking before each batch that the dump still runs:
    on a guest without Linux the scan looks at every page the guest wrote, and a shutdown must not wait for it."""

    def __init__(self, mem, cancelled: threading.Event):
        self.mem, self.cancelled = mem, cancelled

    @property
    def ram(self):
        return self.mem.ram

    def read_frames(self, pfns, **kw):
        if self.cancelled.is_set():
            raise Cancelled()
        return self.mem.read_frames(pfns, **kw)

    def read(self, gpa: int, size: int, **kw) -> bytes:
        return self.mem.read(gpa, size, **kw)


def find_kernel(machine, cancelled: threading.Event | None = None):
    """The guest's Linux kernel (:class:`~sevmon.x86.vmcoreinfo.GuestKernel`) or None, found as the walkers find it
    (:func:`sevmon.machine.kernel_root.kernel_cache`: scanned once, then kept while the guest stays paused).
    DebugError when debugging is refused, Cancelled when ``cancelled`` is set during the scan."""
    mem = machine.memory if cancelled is None else _CancellableMemory(machine.memory, cancelled)
    return kernel_cache(machine).get(mem, machine.ram_runs())


def guest_note(machine, kernel) -> bytes:
    """The ``VMCOREINFO`` note of ``kernel``, or nothing when no 64-bit Linux was found (nothing made up).

    The descriptor is the kernel's own bytes up to the page's first NUL (the kernel keeps the text in a zeroed page
    of its own, ``vmcoreinfo_size`` long), re-read from the page the cache holds: no round trip, and the note holds
    what the guest wrote.
    """
    if kernel is None:
        return b""
    page = machine.memory.read(kernel.gpa, PAGE_SIZE)
    end = page.find(b"\0")
    return vmcoreinfo_note(page[:end] if end >= 0 else page)


JOB = "dump"  # the runner's job kind


class DumpJob:
    def __init__(self, runner, path: str, out: OutputFile, begin, length):
        self.runner, self.machine, self.path, self.out = runner, runner.machine, path, out
        self.begin, self.length = begin, length
        self.status, self.completed, self.total = "active", 0, 0
        self.error: str | None = None
        self.cancelled = threading.Event()
        self.resume = False

    @property
    def active(self) -> bool:
        return self.status == "active"

    def cancel(self) -> None:
        self.cancelled.set()

    def query(self) -> dict:
        return {"status": self.status, "completed": self.completed, "total": self.total}

    def run(self) -> None:
        m = self.machine
        runs = [(first << PAGE_SHIFT, n << PAGE_SHIFT) for first, n in m.ram_runs()]

        def read_run(gpa: int, size: int) -> bytes:
            if self.cancelled.is_set():
                raise Cancelled()
            return self.runner.locked(lambda: m.memory.read_zero_filled(gpa, size))

        def progress(done: int, total: int) -> None:
            self.completed, self.total = done, total

        try:
            kernel = self.runner.locked(lambda: find_kernel(m, self.cancelled))
            note = self.runner.locked(lambda: guest_note(m, kernel))
            write_core(self.out.file, m.cpus, runs, read_run, progress, begin=self.begin, length=self.length,
                       guest_note=note, extra_notes=cbit_note(m.sev.cpuid.cbitpos) if m.sev is not None else b"",
                       alias_bit=cbit_mask(m))
            self.out.commit()
            self.status = "completed"
        except Cancelled:
            self.status, self.error = "failed", "dump cancelled: sevmon is shutting down"
        except DebugError as e:
            self.status, self.error = "failed", e.reason
        except OutputFileError as e:
            self.status, self.error = "failed", str(e)
        except OSError as e:
            self.status, self.error = "failed", f"dump: failed to save memory: {os.strerror(e.errno or 5)}"
        except Exception as e:  # never fail without a message
            self.status, self.error = "failed", f"dump failed: {e}"
        finally:
            if self.status != "completed":
                self.out.abort()   # the target, if any, is untouched
            if self.resume:
                self.runner.locked(self._resume)
            m.emit("DUMP_COMPLETED", {"result": self.query(), **({"error": self.error} if self.error else {})})


    def _resume(self) -> None:
        """QEMU resumes a guest that the dump stopped."""
        self.machine.transition(RunState.PAUSED)
        self.machine.cont()


def start_dump(runner, paging: bool, protocol: str, detach: bool | None, begin, length, format) -> DumpJob:
    machine = runner.machine
    if runner.busy(JOB):
        raise CommandError("There is a dump in process, please wait.")
    if begin is not None and length is None:
        raise CommandError("Parameter 'length' is missing")
    if begin is None and length is not None:
        raise CommandError("Parameter 'begin' is missing")
    if format in UNSUPPORTED_FORMATS:
        raise CommandError(f"{format} is not available now")
    if paging:
        raise CommandError("dump-guest-memory with paging=true is not supported by sevmon; use paging=false")
    if protocol.startswith("fd:"):
        raise CommandError(f"File descriptor named '{protocol[3:]}' has not been found")
    if not protocol.startswith("file:"):
        raise CommandError("Invalid parameter 'protocol'")
    if length is not None and length == 0:
        raise CommandError("Invalid parameter 'length'")
    path = protocol[5:]
    refusal = machine_refusal(machine)
    if refusal:  # before any file is created
        raise CommandError(refusal)
    try:
        out = OutputFile(path)
    except OutputFileError as e:
        raise CommandError(str(e)) from None
    job = DumpJob(runner, path, out, begin, length)
    runner.add_job(JOB, job)
    if machine.running:  # QEMU stops the VM for the dump and resumes it afterwards
        machine.stop()
        machine.transition(RunState.SAVE_VM)
        job.resume = True
    if detach:
        threading.Thread(target=job.run, name="dump", daemon=True).start()
    else:
        job.run()
        if job.status == "failed":
            raise CommandError(job.error or "dump failed")
    return job


def register(registry, hmp, info) -> None:
    @registry.register("dump-guest-memory", attached=OWN)
    def qmp_dump(ctx, paging, protocol, detach=None, begin=None, length=None, format=None):
        start_dump(ctx.runner, paging, protocol, detach, begin, length, format)
        return {}

    @registry.register("query-dump", inline=True, attached=OWN)
    def qmp_query_dump(ctx):
        job = ctx.runner.job(JOB)
        return job.query() if job is not None else {"status": "none", "completed": 0, "total": 0}

    registry.register("query-dump-guest-memory-capability", attached=QEMU)(lambda ctx: {"formats": ["elf"]})

    @hmp.command("dump-guest-memory",
                 "paging:-p,detach:-d,windmp:-w,zlib:-z,lzo:-l,snappy:-s,filename:F,begin:l?,length:i?",
                 "[-p] [-d] [-z|-l|-s|-w] filename [begin length]",
                 "dump guest memory into file 'filename'.\n\t\t\t-p: do paging to get guest's memory mapping."
                 "\n\t\t\t-d: return immediately (do not wait for completion).\n\t\t\t-z: dump in kdump-compressed "
                 "format, with zlib compression.\n\t\t\t-l: dump in kdump-compressed format, with lzo compression."
                 "\n\t\t\t-s: dump in kdump-compressed format, with snappy compression.\n\t\t\t-w: dump in Windows "
                 "crashdump format (can be used instead of ELF-dump converting),\n\t\t\t    for Windows x86 and x64 "
                 "guests with vmcoreinfo driver only.\n\t\t\tbegin: the starting physical address.\n\t\t\tlength: "
                 "the memory size, in bytes.", attached=OWN)
    def hmp_dump(ctx, filename, paging=False, detach=False, windmp=False, zlib=False, lzo=False, snappy=False,
                 begin=None, length=None):
        if zlib + lzo + snappy + windmp > 1:
            ctx.print("Error: only one of '-z|-l|-s|-w' can be set")
            return
        fmt = "kdump-zlib" if zlib else "kdump-lzo" if lzo else "kdump-snappy" if snappy else \
            "win-dmp" if windmp else None
        start_dump(ctx.runner, paging, "file:" + filename, detach, begin, length, fmt)

    @info.command("dump", "", "", "Display the latest dump status", attached=OWN)
    def info_dump(ctx):
        job = ctx.runner.job(JOB)
        q = job.query() if job is not None else {"status": "none", "completed": 0, "total": 0}
        ctx.print(f"Status: {q['status']}")
        if q["status"] == "active":
            pct = q["completed"] * 100.0 / q["total"] if q["total"] else 0.0
            ctx.print(f"Finished: {pct:.2f} %")
