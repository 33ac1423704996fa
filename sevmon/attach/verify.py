"""Each mapped RAM backend checked against QEMU's own reading of a few of its bytes.

QEMU's ``xp`` reads the backend as it is stored (ciphertext for an SEV guest, which
identifies a backend just as well), so a backend sevmon mapped from the wrong file (two
memfds of equal size, NUMA nodes) or at the wrong offset shows different bytes. A running
guest may change a sample between the two readings: a sample counts against a backend only
when sevmon's bytes stayed the same around QEMU's reading and QEMU's differ.
"""

from __future__ import annotations

from sevmon.attach.errors import AttachError

SAMPLE = 64          # bytes per sample (xp /8xg)
PROBES = 8           # places looked at per range, spread over it
WANTED = 4           # samples kept per backend (non-zero ones first)


def _qemu_bytes(text: str) -> bytes | None:
    """``xp /8xg`` text as bytes; None when QEMU could not read there."""
    out = bytearray()
    for line in text.replace("\r\n", "\n").splitlines():
        _, sep, words = line.partition(": ")
        if not sep:
            continue
        for w in words.split():
            if not w.startswith("0x"):
                return None
            out += int(w, 16).to_bytes(8, "little")
    return bytes(out) if len(out) == SAMPLE else None


def samples(ram) -> dict[str, list[int]]:
    """Guest-physical addresses to compare, per backend: spread over each range, those holding
    data first (zeros identify nothing)."""
    picked: dict[str, list[int]] = {}
    for r in ram.ranges:
        step = max(r.size // PROBES, SAMPLE) & ~(SAMPLE - 1)
        for gpa in range(r.gpa, r.gpa + r.size - SAMPLE + 1, step)[:PROBES]:
            picked.setdefault(r.memdev, []).append(gpa)
    out = {}
    for mid, gpas in picked.items():
        gpas.sort(key=lambda g: not any(ram.read(g, SAMPLE)))
        out[mid] = gpas[:WANTED]
    return out


async def verify_backends(link, ram) -> None:
    """AttachError (one sentence) when a mapped backend does not hold what QEMU reads there."""
    for mid, gpas in samples(ram).items():
        for gpa in gpas:
            before = ram.read(gpa, SAMPLE)
            theirs = _qemu_bytes(await link.hmp(f"xp /8xg {gpa:#x}"))
            after = ram.read(gpa, SAMPLE)
            if theirs is None or theirs in (before, after) or before != after:
                continue  # QEMU cannot read it, it agrees, or the guest wrote there meanwhile
            raise AttachError(f"QEMU's RAM backend '{mid}' as sevmon mapped it does not hold what QEMU reads at "
                              f"guest-physical {gpa:#x}: sevmon would read and write the wrong memory")
