"""An attached SEV guest: QEMU's RAM is ciphertext, so sevmon reads it through a mirror VM of QEMU's
(:class:`sevmon.sev.mirror.MirrorSev`, live-attach.md). The C-bit comes from QEMU's ``query-sev-capabilities``,
the policy from ``query-sev`` (and then from the firmware's GUEST_STATUS through the mirror); a NODBG guest is
refused by the debug layer (:class:`sevmon.debug.ops.SevOps`) from every entry point, as for a local guest.
"""

from __future__ import annotations

import ctypes

from sevmon.attach.errors import AttachError
from sevmon.debug.refusal import TYPE_REFUSALS, sev_type
from sevmon.sev.mirror import LinuxProcessOps, MirrorSev, Segment
from sevmon.sev.vm import SevError


def segments_of(ram) -> list[Segment]:
    """Where each guest-physical range of a :class:`sevmon.attach.ram.MappedRAM` sits in sevmon's address space:
    its backend mapping's address plus the range's offset into the backend."""
    bases = {}
    for mid, m in ram._maps.items():
        view = ctypes.c_char.from_buffer(m)
        bases[mid] = ctypes.addressof(view)
        del view
    return [Segment(r.gpa, r.size, bases[r.memdev] + r.offset) for r in ram.ranges]


def open_mirror(pid: int | None, ram, segments: list[Segment], sev_info: dict, caps: dict, *, kernel=None,
                procs=None) -> MirrorSev:
    """The mirror of QEMU's SEV guest. ``kernel``/``procs`` default to the real host's (a fresh VM of sevmon's
    own, and /proc + pidfd); the model passes its own. AttachError (one sentence) when it cannot be had."""
    refused = TYPE_REFUSALS.get(sev_type(sev_info))
    if refused:   # before anything is opened: the kernel would refuse every debug command on this guest
        raise AttachError(refused)
    if pid is None:
        raise AttachError("cannot tell QEMU's process from its monitor socket (no SO_PEERCRED): an SEV guest is "
                          "reached through QEMU's VM fd")
    if "cbitpos" not in caps:
        raise AttachError("QEMU's query-sev-capabilities gave no C-bit position")
    from sevmon.sev.linux import LinuxSevTransport, SevUnavailable
    try:
        if kernel is None:
            kernel = LinuxSevTransport()
        return MirrorSev(kernel, procs or LinuxProcessOps(), pid, segments, ram, policy=sev_info.get("policy", 0),
                         cbitpos=caps["cbitpos"])
    except SevUnavailable as e:  # no /dev/sev, or no cpuid driver (CPUID Fn8000_001F is read through it)
        if kernel is not None:
            kernel.close()
        raise AttachError(f"QEMU runs an SEV guest but sevmon cannot reach it: {e}") from None
    except SevError as e:
        if kernel is not None:
            kernel.close()
        raise AttachError(str(e)) from None
