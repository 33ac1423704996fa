"""``sevmon serve --attach QEMU_QMP_SOCKET``: attach, serve, and end with QEMU.

Start-up is all or nothing: the link, RAM discovery and mapping, and the vCPU count are
settled before sevmon listens; any failure is one sentence and exit status 1 with QEMU's
monitor released. At the end: QEMU quit (its SHUTDOWN went to every client) -> exit 0;
QEMU's socket lost without a SHUTDOWN -> one sentence, exit 1; a signal -> sevmon
detaches (QEMU keeps running), exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import os

from sevmon.attach.commands import build_attached
from sevmon.attach.errors import AttachError
from sevmon.attach.layout import ram_ranges
from sevmon.attach.link import QemuLink
from sevmon.attach.machine import AttachedMachine
from sevmon.attach.ram import device_reader, open_backends
from sevmon.attach.verify import verify_backends
from sevmon.debug.access import DebugMemory
from sevmon.debug.ops import PlainOps
from sevmon.machine.spec import GuestSpec
from sevmon.memory.ram import PAGE_SHIFT
from sevmon.unixsock import SocketInUse

log = logging.getLogger("sevmon")


def _check_qemu_process(link: QemuLink, cpus: list[dict]) -> None:
    """The process sevmon takes QEMU's RAM from must be QEMU's: the one its vCPU threads belong to
    (``query-cpus-fast`` names them). A proxy in front of QEMU is the socket's peer, not QEMU."""
    if link.pid is None or not cpus or "thread-id" not in cpus[0]:
        return
    if not os.path.exists(f"/proc/{link.pid}/task/{cpus[0]['thread-id']}"):
        try:
            with open(f"/proc/{link.pid}/comm") as f:
                comm = f" ({f.read().strip()})"
        except OSError:
            comm = ""
        if link.proxied:
            raise AttachError(f"process {link.pid}{comm} (--qemu-pid) is not the QEMU behind {link.path}: "
                              "its vCPU threads are not there")
        raise AttachError(f"the process behind {link.path}, {link.pid}{comm}, is not QEMU (a proxy?): "
                          "give QEMU's process with --qemu-pid PID")


async def attach(path: str, *, cache_pages: int = 16384, debug_allowed: bool = True,
                 qemu_pid: int | None = None) -> AttachedMachine:
    """Connect to QEMU's monitor at ``path`` (a proxy's when ``qemu_pid`` names QEMU's process) and build the
    attached machine."""
    link = QemuLink(path, qemu_pid)
    await link.connect()
    try:
        memdevs = await link.execute("query-memdev")
        types, paths = {}, {}
        for dev in memdevs:
            types[dev["id"]] = await link.execute("qom-get", {"path": f"/objects/{dev['id']}", "property": "type"})
            if types[dev["id"]] == "memory-backend-file":
                paths[dev["id"]] = await link.execute("qom-get", {"path": f"/objects/{dev['id']}",
                                                                  "property": "mem-path"})
        flat = await link.hmp("info mtree -f")
        ranges = ram_ranges(flat, {d["id"] for d in memdevs})
        cpus = await link.execute("query-cpus-fast")
        if "memory-backend-memfd" in types.values():
            _check_qemu_process(link, cpus)
        hvas = {}
        for r in ranges:  # where QEMU maps each memfd: its file, so equal-size backends cannot be swapped
            if types.get(r.memdev) == "memory-backend-memfd" and r.memdev not in hvas:
                hvas[r.memdev] = _hva(await link.hmp(f"gpa2hva {r.gpa:#x}"))
        ram = open_backends(memdevs, types, paths, link.pid, ranges, hvas)
        try:
            await verify_backends(link, ram)
        except BaseException:
            ram.close()
            raise
        status = await link.execute("query-status")
        kvm = await link.execute("query-kvm")
        try:
            sev_info = await link.execute("query-sev")
        except AttachError:
            sev_info = {}
        sev = bool(sev_info.get("enabled"))
        mirror = None
        if sev:  # the RAM is ciphertext: decrypt through a mirror VM of QEMU's
            from sevmon.attach.sev import open_mirror, segments_of
            caps = await link.execute("query-sev-capabilities")
            try:
                mirror = open_mirror(link.pid, ram, segments_of(ram), sev_info, caps)
            except BaseException:
                ram.close()
                raise
    except BaseException:
        await link.disconnect()
        raise
    if mirror is not None:
        from sevmon.debug.ops import SevOps
        ops = SevOps(ram, mirror, allowed=debug_allowed)
    else:
        ops = PlainOps(ram, allowed=debug_allowed)
    memory = DebugMemory(ram, ops, cache_pages=cache_pages)
    memory.device = device_reader(link)
    memory.memo = {}
    return AttachedMachine(link, ram, memory, len(cpus), status["status"], kvm=kvm, sev=mirror,
                           memory_encryption=sev)


def _hva(text: str) -> int | None:
    """QEMU's ``gpa2hva`` answer: ``Host virtual address for 0x0 (ram0) is 0x7f...``."""
    _, sep, tail = text.strip().rpartition(" is 0x")
    return int(tail, 16) if sep and tail and all(c in "0123456789abcdef" for c in tail) else None


async def detach(machine: AttachedMachine) -> None:
    """Release all that attach took: QEMU's monitor, the mirror VM (its fds), the RAM mappings."""
    await machine.link.disconnect()
    if machine.sev is not None:
        machine.sev.close()
    machine.ram.close()


async def _serve(path: str, spec: GuestSpec, qmp: list[str], hmp: list[str], gdb: str | None,
                 qemu_pid: int | None = None) -> int:
    from sevmon.daemon import run_daemon

    cache_pages = max(0, spec.debug_cache_mb) << (20 - PAGE_SHIFT)
    machine = await attach(path, cache_pages=cache_pages, debug_allowed=spec.debug_policy, qemu_pid=qemu_pid)
    link = machine.link
    link.on_shutdown_seen = lambda: machine.shutdown_seen
    version = link.version

    def configure(server) -> None:
        server.version_info = lambda: version  # the greeting and query-version are QEMU's

    async def until():
        waits = [asyncio.ensure_future(link.closed.wait()), asyncio.ensure_future(link.detach.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        await asyncio.sleep(0.05)  # replies and QEMU's last events reach the clients first

    try:
        await run_daemon(machine, qmp, hmp, build_commands=build_attached, configure=configure,
                         until=until(), gdb=gdb, on_signal="detaching from QEMU, which keeps running")
    finally:
        lost = link.closed.is_set() and not machine.shutdown_seen and not link.detach.is_set()
        detached = link.detach.is_set() and not link.closed.is_set()
        await detach(machine)
        if detached:
            log.info("detached from QEMU (%s): QEMU keeps running the guest", path)
    if lost:
        if link.proxied:
            raise AttachError(f"lost QEMU (process {link.pid}): it ended without a SHUTDOWN (killed or crashed?)")
        raise AttachError(f"lost QEMU's monitor socket {path}: QEMU closed it without a SHUTDOWN "
                          "(killed or crashed?)")
    return 0


def serve_attached(path: str, spec: GuestSpec, qmp: list[str], hmp: list[str], gdb: str | None = None,
                   qemu_pid: int | None = None) -> int:
    """``sevmon serve --attach PATH [--qemu-pid PID]``: ``spec`` gives the debug options (cache size, security
    policy); ``gdb`` a -gdb device for sevmon's stub (memory through the debug path, run control through QEMU);
    ``qemu_pid`` QEMU's process when PATH is a proxy's socket."""
    try:
        return asyncio.run(_serve(path, spec, qmp, hmp, gdb, qemu_pid))
    except (AttachError, SocketInUse) as e:
        log.error("%s", e)
        return 1


def serve_libvirt(domain: str, uri: str | None, spec: GuestSpec, qmp: list[str], hmp: list[str],
                  gdb: str | None = None) -> int:
    """``sevmon serve --libvirt DOMAIN [--connect URI]``: through a libvirt QMP proxy of sevmon's own, which
    ends with sevmon; the domain stays libvirt's."""
    from sevmon.attach.libvirt import open_libvirt
    try:
        proxy, pid = open_libvirt(domain, uri)
    except AttachError as e:
        log.error("%s", e)
        return 1
    try:
        return serve_attached(proxy.socket, spec, qmp, hmp, gdb, qemu_pid=pid)
    finally:
        proxy.close()
