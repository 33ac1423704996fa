"""dump-guest-memory / query-dump / DUMP_COMPLETED, as QEMU 7.2's dump/dump.c behaves
(ELF, paging off), reading plaintext through the debug API so an SEV guest's dump is
usable. A detached dump runs on its own thread, taking the machine lock per chunk, and
reports progress through query-dump. It is the runner's "dump" job: the daemon cancels it on
shutdown and it removes the partial file.
"""

from __future__ import annotations

import contextlib
import os
import threading

from sevmon.debug.ops import DebugError
from sevmon.errors import CommandError
from sevmon.machine.cbit_note import cbit_note
from sevmon.machine.dump import write_core
from sevmon.machine.interface import RunState
from sevmon.memory.ram import PAGE_SHIFT

UNSUPPORTED_FORMATS = ("kdump-zlib", "kdump-lzo", "kdump-snappy", "win-dmp")


class Cancelled(Exception):
    pass


JOB = "dump"  # the runner's job kind


class DumpJob:
    def __init__(self, runner, path: str, fd: int, begin, length):
        self.runner, self.machine, self.path, self.fd = runner, runner.machine, path, fd
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

    def _remove_partial(self) -> None:
        """A failed dump leaves no half-written file behind (only regular files are removed)."""
        with contextlib.suppress(OSError):
            if os.path.isfile(self.path):
                os.unlink(self.path)

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
            with os.fdopen(self.fd, "wb") as f:
                write_core(f, m.cpus, runs, read_run, progress, begin=self.begin, length=self.length,
                           extra_notes=cbit_note(m.sev.cpuid.cbitpos) if m.sev is not None else b"")
            self.status = "completed"
        except Cancelled:
            self.status, self.error = "failed", "dump cancelled: sevmon is shutting down"
            self._remove_partial()
        except DebugError as e:
            self.status, self.error = "failed", e.reason
            self._remove_partial()
        except OSError as e:
            self.status, self.error = "failed", f"dump: failed to save memory: {os.strerror(e.errno or 5)}"
            self._remove_partial()
        except Exception as e:  # never leave a half-written file without a message
            self.status, self.error = "failed", f"dump failed: {e}"
        finally:
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
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
    except OSError as e:
        raise CommandError(f"Could not open '{path}': {os.strerror(e.errno)}") from None
    job = DumpJob(runner, path, fd, begin, length)
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
    @registry.register("dump-guest-memory")
    def qmp_dump(ctx, paging, protocol, detach=None, begin=None, length=None, format=None):
        start_dump(ctx.runner, paging, protocol, detach, begin, length, format)
        return {}

    @registry.register("query-dump", inline=True)
    def qmp_query_dump(ctx):
        job = ctx.runner.job(JOB)
        return job.query() if job is not None else {"status": "none", "completed": 0, "total": 0}

    registry.register("query-dump-guest-memory-capability")(lambda ctx: {"formats": ["elf"]})

    @hmp.command("dump-guest-memory",
                 "paging:-p,detach:-d,windmp:-w,zlib:-z,lzo:-l,snappy:-s,filename:F,begin:l?,length:i?",
                 "[-p] [-d] [-z|-l|-s|-w] filename [begin length]",
                 "dump guest memory into file 'filename'.\n\t\t\t-p: do paging to get guest's memory mapping."
                 "\n\t\t\t-d: return immediately (do not wait for completion).\n\t\t\t-z: dump in kdump-compressed "
                 "format, with zlib compression.\n\t\t\t-l: dump in kdump-compressed format, with lzo compression."
                 "\n\t\t\t-s: dump in kdump-compressed format, with snappy compression.\n\t\t\t-w: dump in Windows "
                 "crashdump format (can be used instead of ELF-dump converting),\n\t\t\t    for Windows x86 and x64 "
                 "guests with vmcoreinfo driver only.\n\t\t\tbegin: the starting physical address.\n\t\t\tlength: "
                 "the memory size, in bytes.")
    def hmp_dump(ctx, filename, paging=False, detach=False, windmp=False, zlib=False, lzo=False, snappy=False,
                 begin=None, length=None):
        if zlib + lzo + snappy + windmp > 1:
            ctx.print("Error: only one of '-z|-l|-s|-w' can be set")
            return
        fmt = "kdump-zlib" if zlib else "kdump-lzo" if lzo else "kdump-snappy" if snappy else \
            "win-dmp" if windmp else None
        start_dump(ctx.runner, paging, "file:" + filename, detach, begin, length, fmt)

    @info.command("dump", "", "", "Display the latest dump status")
    def info_dump(ctx):
        job = ctx.runner.job(JOB)
        q = job.query() if job is not None else {"status": "none", "completed": 0, "total": 0}
        ctx.print(f"Status: {q['status']}")
        if q["status"] == "active":
            pct = q["completed"] * 100.0 / q["total"] if q["total"] else 0.0
            ctx.print(f"Finished: {pct:.2f} %")
