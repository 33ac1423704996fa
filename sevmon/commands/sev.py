"""SEV on the monitor: query-sev*, sev-inject-launch-secret, info sev, migration blockers.

Texts and check orders are QEMU 7.2's (target/i386/sev.c, sev-sysemu-stub.c). Without SEV
every command answers as QEMU 7.2 does on a TCG guest (the transcripts in tests/data).
"""

from __future__ import annotations

import base64

from sevmon.debug.refusal import policy_forbids_debug
from sevmon.errors import CommandError
from sevmon.sev.owner_files import g_base64_decode

SEV_MIGRATION_BLOCKER = "SEV: Migration is not implemented"


def query_sev(machine) -> dict:
    sev = machine.sev
    if sev is None:
        return {"enabled": False, "api-major": 0, "api-minor": 0, "build-id": 0, "policy": 0,
                "state": "uninit", "handle": 0}
    return {"enabled": True, "api-major": sev.api_major, "api-minor": sev.api_minor, "build-id": sev.build_id,
            "policy": sev.policy, "state": sev.state_name, "handle": sev.handle}


def launch_measure(machine) -> dict:
    sev = machine.sev
    if sev is None or sev.state_name in ("uninit", "launch-update") or sev.measurement is None:
        raise CommandError("SEV launch measurement is not available")
    return {"data": base64.b64encode(sev.measurement).decode()}


def capabilities(machine) -> dict:
    sev = machine.sev
    if not machine.config.kvm_enabled:
        raise CommandError("KVM not enabled")
    if sev is None:
        raise CommandError("SEV is not enabled in KVM")
    pdh, chain, cpu0_id = sev.platform_certificates()
    return {"pdh": base64.b64encode(pdh).decode(), "cert-chain": base64.b64encode(chain).decode(),
            "cpu0-id": base64.b64encode(cpu0_id).decode(), "cbitpos": sev.cpuid.cbitpos,
            "reduced-phys-bits": sev.cpuid.reduced_phys_bits}


def attestation_report(machine, mnonce: str) -> dict:
    sev = machine.sev
    if sev is None:
        raise CommandError("SEV is not enabled")
    nonce = g_base64_decode(mnonce)
    if len(nonce) != 16:
        raise CommandError(f"SEV: mnonce must be 16 bytes (got {len(nonce)})")
    return {"data": base64.b64encode(sev.attestation_report(nonce)).decode()}


def inject_launch_secret(machine, packet_header: str, secret: str, gpa: int | None) -> None:
    sev = machine.sev
    if sev is None:
        raise CommandError("SEV not enabled for guest")
    if gpa is None:  # QEMU looks the area up in the OVMF table of pflash unit 0
        from sevmon.machine.ovmf_table import secret_area
        area = secret_area(machine.config.ovmf_table)
        if area is None:
            raise CommandError("SEV: no secret area found in OVMF, gpa must be specified.")
        gpa = area[0]
    if sev.state_name != "launch-secret":
        raise CommandError(f"SEV: Not in correct state. (LSECRET) {sev.state_number:x}")
    hdr = g_base64_decode(packet_header)
    if not hdr:
        raise CommandError("SEV: Failed to decode sequence header")
    data = g_base64_decode(secret)
    if not data:
        raise CommandError("SEV: Failed to decode data")
    for pfn in range(gpa >> 12, ((gpa + len(data) - 1) >> 12) + 1):
        if not sev.ram.has(pfn) and (pfn << 12) >= sev.ram.size:
            raise CommandError(f"SEV: Failed to calculate guest address: No memory is mapped at address 0x{gpa:x}")
    try:
        sev.inject_launch_secret(hdr, data, gpa)
    except Exception as e:  # SevError: "ret=%d fw_error=%d '%s'" as QEMU words it
        fw = getattr(e, "fw_error", None) or 0
        ret = -1
        raise CommandError(f"SEV: failed to inject secret ret={ret} fw_error={fw} '{_fw_text(fw)}'") from None


def _fw_text(code: int) -> str:
    try:
        from sevmon.sev.abi import qemu_fw_error_str
        return qemu_fw_error_str(code)
    except Exception:
        return ""


def migration_blocker(machine) -> str | None:
    """QEMU registers its SEV blocker at LAUNCH_FINISH (first run); before that nothing blocks."""
    sev = machine.sev
    if sev is not None and sev.state_name == "running":
        return SEV_MIGRATION_BLOCKER
    return None


def register(registry, hmp, info) -> None:
    registry.register("query-sev")(lambda ctx: query_sev(ctx.machine))
    registry.register("query-sev-launch-measure")(lambda ctx: launch_measure(ctx.machine))
    registry.register("query-sev-capabilities")(lambda ctx: capabilities(ctx.machine))
    registry.register("query-sev-attestation-report")(lambda ctx, mnonce: attestation_report(ctx.machine, mnonce))

    @registry.register("sev-inject-launch-secret")
    def sev_inject(ctx, packet_header, secret, gpa=None):
        inject_launch_secret(ctx.machine, packet_header, secret, gpa)
        return {}

    @info.command("sev", "", "", "show SEV information")
    def info_sev(ctx):
        s = query_sev(ctx.machine)
        if not s["enabled"]:
            ctx.print("SEV is not enabled")
            return
        ctx.print(f"handle: {s['handle']}")
        ctx.print(f"state: {s['state']}")
        ctx.print(f"build: {s['build-id']}")
        ctx.print(f"api version: {s['api-major']}.{s['api-minor']}")
        ctx.print(f"debug: {'off' if policy_forbids_debug(s['policy']) else 'on'}")
        ctx.print(f"key-sharing: {'off' if s['policy'] & 0x2 else 'on'}")

    @hmp.command("savevm", "name:s?", "tag", "save a VM snapshot. If no tag is provided, a new snapshot is created")
    def hmp_savevm(ctx, name=None):
        ctx.print("Error: " + (migration_blocker(ctx.machine) or "no block device can store vmstate for snapshot"))
