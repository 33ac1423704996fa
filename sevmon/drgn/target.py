"""``program(socket, vmlinux=...)``: a ``drgn.Program`` over a live guest that sevmon serves.

drgn's custom Linux target (``set_linux_kernel_custom``) needs two things: the kernel's VMCOREINFO text, which
sevmon found in guest RAM through the debug path (``query-guest-kernel``), and a physical-memory reader, which is
:class:`~sevmon.drgn.reader.PhysicalReader` over ``read-guest-physical``. drgn walks the kernel's page tables
itself from VMCOREINFO, so it needs no vCPU registers (an SEV-ES guest's are encrypted) and every byte it sees
came through sevmon's refusal rule, DBG_DECRYPT and page cache.
"""

from __future__ import annotations

import logging
import os

from sevmon.drgn.qmp_client import QmpClient, QmpError
from sevmon.drgn.reader import PhysicalReader, ReadFault

#: drgn's physical segment: all of x86-64's guest-physical space (52 bits); what is not RAM, the daemon refuses
PHYSICAL_SPACE = 1 << 52


class DrgnSetupError(Exception):
    """Why no Program could be made (one sentence)."""


def import_drgn():
    try:
        import drgn
    except ImportError:
        raise DrgnSetupError("drgn is not installed: pip install 'sevmon[drgn]'") from None
    return drgn


def segment_reader(read, drgn):
    """drgn's ``read_fn(address, count, offset, physical)`` over ``read(address, count)``; a refused read
    (:class:`ReadFault`) is drgn's FaultError at that address."""
    def read_fn(address: int, count: int, offset: int, physical: bool) -> bytes:
        try:
            return read(address, count)
        except ReadFault as e:
            raise drgn.FaultError(e.reason, e.address) from None
    return read_fn


def kernel_program(vmcoreinfo: str, read, vmlinux: str | None):
    """A ``drgn.Program`` of the Linux kernel that ``vmcoreinfo`` describes, all of guest-physical memory read by
    ``read(address, count)``, with ``vmlinux``'s debug info (DrgnSetupError when drgn refuses either). Without a
    vmlinux the Program has no symbols but reads memory by address, virtual ones through the kernel's own tables
    (``prog.read(0xffffffff81000000, 16)``): the built-in guest has no vmlinux.
    ``sevmon.drgn.program`` gives it sevmon's QMP reader; the benchmark gives it others."""
    drgn = import_drgn()
    platform = drgn.Platform(drgn.Architecture.X86_64,
                             drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN)
    prog = drgn.Program(platform)
    prog.add_memory_segment(0, PHYSICAL_SPACE, segment_reader(read, drgn), physical=True)
    try:
        prog.set_linux_kernel_custom(vmcoreinfo.encode(), True)
    except Exception as e:  # drgn's BadDataError is not public: any refusal of the text, in its words
        raise DrgnSetupError(f"drgn cannot use the guest's VMCOREINFO: {e}") from None
    if vmlinux is None:
        return prog
    # drgn ignores a file that is not the kernel's (its build ID differs) with a log line and loads nothing: quiet
    # its logger while loading, then say so in one sentence
    log = logging.getLogger("drgn")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        prog.load_debug_info([vmlinux])
    except drgn.MissingDebugInfoError:
        pass
    finally:
        log.setLevel(level)
    try:
        loaded = prog.main_module().debug_file_path is not None
    except LookupError:
        loaded = False
    if not loaded:
        release = next((ln.partition("=")[2] for ln in vmcoreinfo.splitlines() if ln.startswith("OSRELEASE=")), "?")
        raise DrgnSetupError(f"{vmlinux} is not the debug vmlinux of the guest's kernel {release} (no debug info "
                             "with the kernel's build ID)")
    return prog


def cbit_mask(client: QmpClient, vmcoreinfo: str) -> int:
    """The C-bit drgn will find in the guest's page-table entries, to be stripped from the physical addresses it
    reads: sevmon's (``query-sev``, ``query-sev-capabilities``' ``cbitpos``) when the guest is an SEV guest, and the
    kernel's own ``NUMBER(sme_mask)`` (a Linux SEV guest writes its ``sme_me_mask`` into VMCOREINFO).

    Why: drgn walks the kernel's tables itself and takes an entry's address bits as they are; on an SEV guest every
    entry carries the C-bit (bit 47, or 51 on Milan/Genoa), so drgn asks for e.g. ``0x800018216000``, which is the
    private page at ``0x18216000``."""
    mask = 0
    for line in vmcoreinfo.splitlines():
        if line.startswith("NUMBER(sme_mask)="):
            try:
                mask |= int(line.partition("=")[2], 0)
            except ValueError:
                pass
    try:
        if client.execute("query-sev").get("enabled"):
            mask |= 1 << client.execute("query-sev-capabilities")["cbitpos"]
    except QmpError:  # not an SEV guest (QEMU without SEV refuses both)
        pass
    return mask


def connect(socket_path: str) -> tuple[QmpClient, str]:
    """A QMP connection to sevmon and the guest kernel's VMCOREINFO text (DrgnSetupError: one sentence why not)."""
    from sevmon.drgn.qmp_client import QmpConnectionError
    try:
        client = QmpClient(socket_path)
    except QmpConnectionError as e:
        raise DrgnSetupError(str(e)) from None
    try:
        kernel = client.execute("query-guest-kernel")
    except QmpError as e:
        client.close()
        if e.error_class == "CommandNotFound":
            raise DrgnSetupError(f"{socket_path}: not a sevmon monitor (it has no query-guest-kernel)") from None
        raise DrgnSetupError(e.desc) from None
    return client, kernel["vmcoreinfo"]


def program(socket: str, vmlinux: str | os.PathLike | None = None, *, cache: bool = True):
    """A ``drgn.Program`` for the Linux guest sevmon serves on QMP ``socket``, with ``vmlinux``'s debug info
    (None: no symbols, memory by address only).

    ``prog.config["sevmon_reader"]`` is the reader (:class:`PhysicalReader`): its ``requests`` and ``reads``
    count what drgn asked, ``drop()`` forgets the client-side pages. ``cache=False`` sends every drgn read to the
    daemon (the daemon's page cache still applies). Raises DrgnSetupError (one sentence) when drgn is missing,
    the socket is not sevmon's, debugging is refused, no Linux kernel is found, or drgn cannot use the
    VMCOREINFO or the vmlinux.
    """
    import_drgn()
    path = None if vmlinux is None else os.fspath(vmlinux)
    if path is not None and not os.path.isfile(path):
        raise DrgnSetupError(f"{path}: no such file (the guest kernel's debug vmlinux)")
    client, vmcoreinfo = connect(socket)
    reader = PhysicalReader(client, cache=cache, cbit_mask=cbit_mask(client, vmcoreinfo))
    try:
        prog = kernel_program(vmcoreinfo, reader.read, path)
    except BaseException:
        client.close()
        raise
    prog.config["sevmon_reader"] = reader
    return prog
