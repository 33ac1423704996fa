"""Migration of an SEV guest between two sevmon daemons: SEND_*/RECEIVE_* (sev-api.md §3.9).

Source: ``migrate-set-parameters`` takes the target's ``sev-pdh``, ``sev-plat-cert`` and
``sev-amd-cert`` (base64, the parameter names of the SEV live-migration series); ``migrate``
(``unix:PATH`` or ``exec:COMMAND``) runs a job on its own thread, taking the machine lock
per chunk of pages so the guest keeps running (and dirtying pages) meanwhile. It is the
runner's "migration" job (one at a time; ``query-migrate`` reads it; shutdown cancels it):

1. SEND_START (the firmware checks the policy and the target's chain; NOSEND fails here and
   the guest runs on);
2. SEND_UPDATE_DATA for every guest page, ``max-bandwidth`` bytes per second at most;
3. the guest is stopped (STOP, ``finish-migrate``), pages whose ciphertext changed since
   they were sent go again (the hypervisor's dirty log: it sees ciphertext change), then
   the vCPU state and END;
4. over ``unix:`` the target's answer: ``OK`` -> SEND_FINISH, the source ends ``postmigrate``;
   anything else (a refused page, a cut stream) -> SEND_CANCEL and the guest resumes
   ``running`` (RESUME), as QEMU does after a failed migration.

``query-migrate`` and MIGRATION events follow QEMU (setup, active, completed|failed).
Target (``--incoming``): RECEIVE_START (new handle, new VEK), RECEIVE_UPDATE_DATA per page
(MAC checked before anything is written), RECEIVE_FINISH, then it runs (or stays paused
under ``-S``). A failed incoming migration drops every page it received and stays in
``inmigrate``; it accepts one stream, as a QEMU target does.
Stream format: :mod:`sevmon.machine.migration_stream`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
import subprocess
import threading
import time
import weakref

from sevmon.commands.sev import g_base64_decode
from sevmon.errors import CommandError
from sevmon.machine import migration_stream as ms
from sevmon.machine.incoming import IncomingMachine
from sevmon.machine.interface import RunState
from sevmon.memory.ram import PAGE_SHIFT, PAGE_SIZE
from sevmon.x86.cpu import CpuState

log = logging.getLogger("sevmon")

CHUNK_PAGES = 32            # pages sent per hold of the machine lock
ACK_TIMEOUT = 120.0         # seconds to wait for the target's answer
JOB = "migration"           # the runner's job kind (outgoing or incoming)

#: migrate-set-parameters, per daemon (QEMU keeps them in its MigrationState)
_PARAMETERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ram_stats(done: int, total: int, elapsed: float) -> dict:
    return {"transferred": done * PAGE_SIZE, "remaining": max(total - done, 0) * PAGE_SIZE,
            "total": total * PAGE_SIZE, "duplicate": 0, "skipped": 0, "normal": done,
            "normal-bytes": done * PAGE_SIZE, "dirty-pages-rate": 0,
            "mbps": round(done * PAGE_SIZE * 8 / 1e6 / elapsed, 3) if elapsed > 0 else 0.0,
            "dirty-sync-count": 1, "postcopy-requests": 0, "page-size": PAGE_SIZE, "multifd-bytes": 0,
            "pages-per-second": int(done / elapsed) if elapsed > 0 else 0, "precopy-bytes": done * PAGE_SIZE,
            "downtime-bytes": 0, "postcopy-bytes": 0, "dirty-sync-missed-zero-copy": 0}


class _Transport:
    """Where the stream goes/comes from: a connected UNIX socket, or a shell command's pipe."""

    def __init__(self, f, *, sock=None, proc=None):
        self.f, self.sock, self.proc = f, sock, proc

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.wait(30)


def _parse_uri(uri: str) -> tuple[str, str]:
    kind, sep, rest = uri.partition(":")
    if not sep or kind not in ("unix", "exec", "tcp", "fd", "rdma", "file") or not rest:
        raise CommandError("Parameter 'uri' expects a valid migration protocol")
    if kind not in ("unix", "exec"):
        raise CommandError(f"sevmon migrates over unix: and exec: only, not {kind}:")
    return kind, rest


class MigrationJob:
    """One outgoing migration (the source side)."""

    def __init__(self, runner, kind: str, target: str, params: dict):
        self.runner, self.machine = runner, runner.machine
        self.kind, self.target, self.params = kind, target, params
        self.status = "setup"
        self.error: str | None = None
        self.done = self.total = 0
        self.start = time.monotonic()
        self.end: float | None = None
        self.downtime = 0
        self.cancelled = threading.Event()

    @property
    def active(self) -> bool:
        return self.status in ("setup", "active")

    def cancel(self) -> None:
        self.cancelled.set()

    def query(self) -> dict:
        elapsed = (self.end or time.monotonic()) - self.start
        out = {"status": self.status}
        if self.status == "failed":
            out["error-desc"] = self.error or "migration failed"
            return out
        if self.status in ("active", "completed"):
            out["ram"] = _ram_stats(self.done, self.total, elapsed)
            out["total-time"] = int(elapsed * 1000)
            out["setup-time"] = 0
            if self.status == "completed":
                out["downtime"] = self.downtime
            else:
                out["expected-downtime"] = 300
        return out

    def _set(self, status: str) -> None:
        self.status = status
        self.machine.emit("MIGRATION", {"status": status})

    def _open(self) -> _Transport:
        if self.kind == "unix":
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(ACK_TIMEOUT)
            try:
                s.connect(self.target)
            except OSError as e:
                s.close()
                raise OSError(e.errno, f"Failed to connect to '{self.target}': {os.strerror(e.errno or 5)}") from None
            return _Transport(s.makefile("rwb"), sock=s)
        proc = subprocess.Popen(["/bin/sh", "-c", self.target], stdin=subprocess.PIPE)
        return _Transport(proc.stdin, proc=proc)

    def run(self) -> None:
        m, lock = self.machine, self.runner.lock
        sev = m.sev
        from sevmon.sev import migration_vmm as mig
        from sevmon.sev.vm import SevError
        sending = was_running = False
        t = None
        try:
            t = self._open()
            with lock:
                source_pdh = sev.platform_certificates()[0]
                session, policy = mig.send_start(sev, self.params["sev-pdh"], self.params["sev-plat-cert"],
                                                 self.params.get("sev-amd-cert", b""))
                sending = True
                pfns = list(m.ram.frames())
            self.total = len(pfns)
            self._set("active")
            self._write(t, ms.MAGIC + ms.json_record(ms.HEADER, {"ram-size": m.ram.size, "cbitpos": sev.cpuid.cbitpos,
                                                            "vcpus": len(m.cpus)}))
            self._write(t, ms.record(ms.SEV_START, source_pdh + session + struct.pack("<I", policy)))
            sent: dict[int, bytes] = {}
            bandwidth = self.params.get("max-bandwidth") or 0
            for i in range(0, len(pfns), CHUNK_PAGES):
                if self.cancelled.is_set():
                    raise OSError("migration cancelled: sevmon is shutting down")
                t0 = time.monotonic()
                out = self._send_pages(mig, pfns[i:i + CHUNK_PAGES], sent)
                self._write(t, out)
                self.done += len(pfns[i:i + CHUNK_PAGES])
                if bandwidth:  # max-bandwidth, bytes per second
                    time.sleep(max(0.0, len(out) / bandwidth - (time.monotonic() - t0)))
            with lock:  # stop-and-copy: the guest is paused for the rest
                stop_at = time.monotonic()
                was_running = m.running
                if was_running:
                    m.stop()
                m.transition(RunState.FINISH_MIGRATE)
                dirty = [pfn for pfn in m.ram.frames()
                         if sent.get(pfn) != hashlib.sha256(m.ram.frame(pfn)).digest()]
                self.total += len(dirty)
                tail = self._send_pages(mig, dirty, sent, locked=True)
                self.done += len(dirty)
                cpus = [{"index": c.index, "regs": c.regs} for c in m.cpus]
            self._write(t, tail + ms.json_record(ms.CPU, cpus) + ms.record(ms.END, struct.pack("<Q", self.done)))
            answer = self._answer(t)
            if answer != "OK":
                raise OSError(answer)
            with lock:
                mig.send_finish(sev)
                sending = False
                m.transition(RunState.POSTMIGRATE)
            self.downtime = int((time.monotonic() - stop_at) * 1000)
            self.end = time.monotonic()
            self._set("completed")
        except Exception as e:  # every failure: the guest stays here and runs on, one line says why
            self.error = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
            with lock:
                if sending:
                    with contextlib.suppress(SevError):
                        mig.send_finish(sev, cancel=True)  # SEND_CANCEL: the guest stays here
                if m.state is RunState.FINISH_MIGRATE:
                    m.transition(RunState.PAUSED)
                if was_running:
                    m.cont()
            self.end = time.monotonic()
            log.info("migration failed: %s", self.error)
            self._set("failed")
        finally:
            if t is not None:
                t.close()

    def _send_pages(self, mig, pfns, sent, *, locked: bool = False) -> bytes:
        m = self.machine
        out = []
        with contextlib.nullcontext() if locked else self.runner.lock:
            for pfn in pfns:
                if not m.ram.has(pfn):
                    continue
                gpa = pfn << PAGE_SHIFT
                hdr, trans = mig.send_page(m.sev, gpa)
                sent[pfn] = hashlib.sha256(m.ram.frame(pfn)).digest()
                out.append(ms.page_record(gpa, hdr, trans))
        return b"".join(out)

    def _write(self, t: _Transport, data: bytes) -> None:
        """Send; if the target hung up, its answer on the return path says why."""
        try:
            t.f.write(data)
            t.f.flush()
        except OSError as e:
            reason = None
            if t.sock is not None:
                with contextlib.suppress(OSError, ValueError):
                    t.sock.settimeout(5)
                    line = t.sock.recv(65536).decode(errors="replace").strip()
                    if line.startswith("ERR "):
                        reason = line.removeprefix("ERR ").splitlines()[0].strip()
            raise OSError(e.errno, reason or f"the migration stream broke: {e.strerror or e}") from None

    def _answer(self, t: _Transport) -> str:
        if t.sock is None:  # exec: no return path; the command must succeed
            t.f.close()
            rc = t.proc.wait(ACK_TIMEOUT)
            return "OK" if rc == 0 else f"the migration command exited with status {rc}"
        t.sock.shutdown(socket.SHUT_WR)
        line = t.f.readline().decode(errors="replace").strip()
        if not line:
            return "the target closed the migration stream without an answer"
        return "OK" if line == "OK" else line.removeprefix("ERR ").strip()


# -- the target -------------------------------------------------------------------------------
class IncomingMigration:
    """One incoming migration (the target side), on its own thread: the runner's "migration" job
    until it has received its guest (or failed)."""

    def __init__(self, runner, uri: str):
        self.runner, self.machine, self.uri = runner, runner.machine, uri
        self.kind, self.where = uri.partition(":")[0], uri.partition(":")[2]
        self.status = "none"
        self.error: str | None = None
        self.listener = None
        self.conn = None
        self.pages = 0
        self.cancelled = threading.Event()

    @property
    def active(self) -> bool:
        return self.status == "active"

    def cancel(self) -> None:
        """Shutdown: stop listening, cut a stream being received (the guest is dropped)."""
        self.cancelled.set()
        self.close()
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RDWR)

    def query(self) -> dict:
        if self.status == "none":
            return {}
        out = {"status": self.status}
        if self.error:
            out["error-desc"] = self.error
        return out

    def open(self) -> None:
        """Bind now (before the daemon says it is ready), so a source can connect at once."""
        if self.kind == "unix":  # SocketInUse (one sentence) if PATH is taken
            from sevmon.unixsock import listen_unix
            self.listener = listen_unix(self.where, backlog=1)
            self.listener.setblocking(True)
        threading.Thread(target=self.run, name="incoming-migration", daemon=True).start()

    def close(self) -> None:
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.close()
            with contextlib.suppress(OSError):
                os.unlink(self.where)

    def run(self) -> None:
        conn = proc = None
        try:
            if self.kind == "unix":
                conn, _ = self.listener.accept()
                self.conn = conn
                f = conn.makefile("rwb")
            else:
                proc = subprocess.Popen(["/bin/sh", "-c", self.where], stdout=subprocess.PIPE)
                f = proc.stdout
            self.status = "active"
            self.machine.emit("MIGRATION", {"status": "active"})
            self._receive(f)
            self._reply(f, conn, "OK")
            self.status = "completed"
            self.machine.emit("MIGRATION", {"status": "completed"})
        except Exception as e:  # every failure: one line, nothing half-applied
            self.error = str(e)
            log.error("load of migration failed: %s", self.error)
            self._discard()
            if conn is not None:
                self._reply(f, conn, "ERR " + self.error)
            self.status = "failed"
            self.machine.emit("MIGRATION", {"status": "failed"})
        finally:
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.close()
            if proc is not None:
                with contextlib.suppress(Exception):
                    proc.kill()
                    proc.wait(5)
            self.close()

    @staticmethod
    def _reply(f, conn, line: str) -> None:
        if conn is None:
            return
        with contextlib.suppress(OSError):
            f.write(line.replace("\n", " ").encode() + b"\n")
            f.flush()

    def _discard(self) -> None:
        m = self.machine
        with self.runner.lock:
            for pfn in list(m.ram.frames()):
                m.ram.drop(pfn)
            m.memory.invalidate()

    def _receive(self, f) -> None:
        from sevmon.sev import migration_vmm as mig
        m = self.machine
        ms.read_magic(f)
        kind, payload = ms.read_record(f)
        if kind != ms.HEADER:
            raise ms.StreamError("the migration stream does not start with its HEADER")
        header = json.loads(payload)
        if header.get("ram-size") != m.ram.size:
            raise ms.StreamError(f"the source has {header.get('ram-size')} bytes of guest RAM, this target "
                                 f"{m.ram.size}: start it with the same guest options")
        cpus = None
        started = False
        while True:
            kind, payload = ms.read_record(f)
            if kind == ms.SEV_START:
                if len(payload) != 2084 + 128 + 4:
                    raise ms.StreamError("a SEV-START record of the wrong size")
                with self.runner.lock:
                    mig.receive_start(m.sev, payload[:2084], payload[2084:2212],
                                      struct.unpack_from("<I", payload, 2212)[0])
                started = True
            elif kind == ms.PAGE:
                if not started:
                    raise ms.StreamError("a PAGE record before SEV-START")
                gpa, hdr, trans = ms.parse_page(payload)
                with self.runner.lock:
                    mig.receive_page(m.sev, gpa, hdr, trans)
                self.pages += 1
            elif kind == ms.CPU:
                cpus = json.loads(payload)
            elif kind == ms.END:
                break
            else:
                raise ms.StreamError(f"an unexpected record of type {kind}")
        if not started or cpus is None:
            raise ms.StreamError("the migration stream has no SEV-START or CPU record")
        with self.runner.lock:
            mig.receive_finish(m.sev)
            m.arrived([CpuState(c["index"], {k: int(v) for k, v in c["regs"].items()}) for c in cpus])


def start_incoming(runner) -> IncomingMigration | None:
    """Called by the daemon before it listens: bind the --incoming endpoint, start receiving."""
    machine = runner.machine
    if not isinstance(machine, IncomingMachine):
        return None
    inc = IncomingMigration(runner, machine.uri)
    runner.add_job(JOB, inc)
    inc.open()
    return inc


# -- commands ---------------------------------------------------------------------------------
def _params(runner) -> dict:
    return _PARAMETERS.setdefault(runner, {})


def migrate(runner, uri: str) -> None:
    machine = runner.machine
    if runner.busy(JOB):
        raise CommandError("There's a migration process in progress")
    kind, target = _parse_uri(uri)
    if not machine.capabilities.migrate or machine.sev is None:
        raise CommandError("sevmon migrates SEV guests only (SEND/RECEIVE): this guest has no SEV context")
    state = machine.state
    if state in (RunState.INMIGRATE, RunState.POSTMIGRATE, RunState.PRELAUNCH) or machine.sev.state_name != "running":
        raise CommandError(f"cannot migrate the guest in state {state.value} (SEV {machine.sev.state_name}): "
                       "its launch must be finished and it must not have left already")
    params = _params(runner)
    if not params.get("sev-pdh") or not params.get("sev-plat-cert"):
        raise CommandError("SEV migration needs the target's PDH and platform certificates: set sev-pdh and "
                       "sev-plat-cert with migrate-set-parameters first")
    job = MigrationJob(runner, kind, target, dict(params))
    runner.add_job(JOB, job)
    machine.emit("MIGRATION", {"status": "setup"})
    threading.Thread(target=job.run, name="migration", daemon=True).start()


def set_parameters(runner, **kw) -> None:
    params = _params(runner)
    kw = {k.replace("_", "-"): v for k, v in kw.items()}  # handlers get QAPI names with '_'
    for name in ("sev-pdh", "sev-plat-cert", "sev-amd-cert"):
        if kw.get(name) is not None:
            params[name] = g_base64_decode(kw[name])
    if kw.get("max-bandwidth") is not None:
        params["max-bandwidth"] = kw["max-bandwidth"]


def query_migrate(runner) -> dict:
    job = runner.job(JOB)
    return job.query() if job is not None else {}


def register(registry, hmp, info) -> None:
    @registry.register("migrate")
    def qmp_migrate(ctx, uri, blk=None, inc=None, detach=None, resume=None):
        migrate(ctx.runner, uri)
        return {}

    @registry.register("migrate-set-parameters")
    def qmp_set(ctx, **kw):
        set_parameters(ctx.runner, **kw)
        return {}

    registry.register("query-migrate")(lambda ctx: query_migrate(ctx.runner))

    @hmp.command("migrate", "detach:-d,blk:-b,inc:-i,resume:-r,uri:s", "[-d] [-b] [-i] [-r] uri",
                 "migrate to URI (using -d to not wait for completion)\n\t\t\t -b for migration without shared "
                 "storage with full copy of disk\n\t\t\t -i for migration without shared storage with incremental "
                 "copy of disk (base image shared between src and destination)\n\t\t\t -r to resume a paused migration")
    def hmp_migrate(ctx, uri, detach=False, blk=False, inc=False, resume=False):
        migrate(ctx.runner, uri)  # a CommandError is printed as QEMU's "Error: ..." line by the monitor

    @info.command("migrate", "", "", "show migration status")
    def info_migrate(ctx):
        q = query_migrate(ctx.runner)
        if "status" in q:
            ctx.print(f"Migration status: {q['status']}")
        if "ram" in q:
            ctx.print(f"transferred ram: {q['ram']['transferred'] >> 10} kbytes")
            ctx.print(f"total ram: {q['ram']['total'] >> 10} kbytes")
        if "error-desc" in q:
            ctx.print(f"Error: {q['error-desc']}")

