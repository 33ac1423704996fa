"""The machine thread and the job registry, shared by every front end (QMP, HMP, gdb).

QEMU runs monitor commands under its big lock, one at a time, while its main loop keeps serving I/O. sevmon does
the same: every piece of machine work (a command, a guest time slice, a chunk of a background job) runs on one
thread under one lock, so the asyncio loop stays free for greetings, parse errors and other clients, and no front
end locks or schedules on its own.

Background jobs (a detached dump, a migration out or in) are registered by kind, so a second one of the same kind is
refused, ``query-*`` commands find the current one, and shutdown cancels them all.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

from sevmon.machine.interface import Machine

T = TypeVar("T")


class Job(Protocol):
    """A long operation that runs beside commands (taking the machine lock per chunk)."""

    @property
    def active(self) -> bool: ...

    def cancel(self) -> None: ...


class MachineRunner:
    """Runs work for ``machine`` on the machine thread; holds the background jobs."""

    def __init__(self, machine: Machine):
        self.machine = machine
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="machine")
        self.lock = threading.RLock()
        self.jobs: dict[str, Job] = {}

    # -- commands ------------------------------------------------------------------------
    def run_command(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` as one monitor command, in the calling thread: under the lock, after the machine made its
        cache coherent with the guest (``begin_command``)."""
        with self.lock:
            self.machine.begin_command()
            return fn()

    async def command(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` as one monitor command on the machine thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.run_command, fn)

    def locked(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` under the machine lock without starting a command (a job's chunk, a stats snapshot)."""
        with self.lock:
            return fn()

    async def guest_slice(self) -> None:
        """Give a running guest one time slice on the machine thread."""
        if self.machine.running and self.machine.capabilities.run_guest:
            await asyncio.get_running_loop().run_in_executor(
                self.executor, self.locked, self.machine.run_guest)

    async def idle(self) -> None:
        """Return once the machine thread has finished what was queued before."""
        await asyncio.get_running_loop().run_in_executor(self.executor, lambda: None)

    # -- jobs ----------------------------------------------------------------------------
    def job(self, kind: str) -> Job | None:
        """The current (or last) job of ``kind``."""
        return self.jobs.get(kind)

    def busy(self, kind: str) -> bool:
        job = self.jobs.get(kind)
        return job is not None and job.active

    def add_job(self, kind: str, job: Job) -> None:
        self.jobs[kind] = job

    async def cancel_jobs(self, timeout: float = 10.0) -> None:
        """Cancel every active job and wait (bounded) for each to clean up after itself."""
        active = [j for j in self.jobs.values() if j.active]
        for job in active:
            job.cancel()
        deadline = asyncio.get_running_loop().time() + timeout
        while any(j.active for j in active) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
