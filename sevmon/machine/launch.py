"""The SEV launch, in one place for every kind of local guest.

QEMU's order: ``sev_kvm_init`` (C-bit check, platform status, KVM_SEV_INIT, RAM registered), LAUNCH_START (with
the guest owner's DH certificate and session when given), LAUNCH_UPDATE_DATA over each image (firmware, pflash
unit 0, or a whole loaded image), LAUNCH_MEASURE; LAUNCH_FINISH comes on the first transition to running (under
``-S``, only on the first ``cont``), which is the machine's first run. A migration target opens the context the same
way but receives its guest (RECEIVE_*) instead of launching one.
"""

from __future__ import annotations

from sevmon.machine.cpu_models import cpuid_signature
from sevmon.machine.ovmf_table import SEV_INFO_BLOCK_GUID
from sevmon.machine.spec import SevSpec
from sevmon.memory.ram import RAM
from sevmon.sev.abi import Policy
from sevmon.sev.vmsa import BSP_RESET_EIP, reset_vmsa

#: ASIDs below min_sev_asid that the model host of an SEV-ES guest keeps for SEV-ES (a BIOS setting on real hosts)
MODEL_ES_ASIDS = 99


class PlatformFileError(Exception):
    """--sev-platform names a file that is not a sevmon platform file: one sentence."""


def sev_kernel(spec: SevSpec):
    """The one place that chooses the kernel transport under :class:`~sevmon.sev.vm.SevVm`: real /dev/kvm +
    /dev/sev, or the platform model (``sevmon.model``): a fresh simulated platform whose CPUID reports the spec's
    C-bit, or the one whose keys ``--sev-platform`` keeps."""
    if spec.kvm:
        from sevmon.sev.linux import LinuxSevTransport
        return LinuxSevTransport()  # raises SevUnavailable with one sentence on hosts without SEV
    from sevmon.model import SimulatedHost, SimulatedKvm
    es = bool(spec.policy & Policy.ES)  # a host whose CPU and BIOS give SEV-ES ASIDs, and CONFIG.ES at INIT
    host = SimulatedHost(cbitpos=spec.cbitpos, reduced_phys_bits=max(spec.reduced_phys_bits, 0),
                         min_asid=MODEL_ES_ASIDS + 1 if es else 1, sev_es=es)
    if not spec.platform_file:
        return SimulatedKvm(host)
    from sevmon.model.platform_store import load_or_create
    try:
        load_or_create(spec.platform_file, host.psp)
    except (ValueError, KeyError, TypeError) as e:
        raise PlatformFileError(f"--sev-platform {spec.platform_file}: not a sevmon platform file ({e})") from None
    return SimulatedKvm(host)


def open_sev(ram: RAM, spec: SevSpec):
    """``sev_kvm_init`` for ``ram``: the SEV context, before LAUNCH_START (or RECEIVE_START)."""
    from sevmon.sev.owner_files import owner_launch_files
    from sevmon.sev.vm import SevVm
    return SevVm(ram, policy=spec.policy, cbitpos=spec.cbitpos, reduced_phys_bits=spec.reduced_phys_bits,
                 kernel=sev_kernel(spec), **owner_launch_files(spec.session_file, spec.dh_cert_file))


class EsLaunchError(Exception):
    """An SEV-ES launch QEMU would refuse (no SEV-ES reset block for the APs): QEMU's sentence."""


def es_vmsas(spec: SevSpec, smp: int, cpu_model: str, ovmf_table: dict[str, bytes] | None) -> list[bytes]:
    """The VMSAs QEMU 7.2 has KVM encrypt for an SEV-ES guest, BSP first: the BSP at the reset vector, each AP at
    the SEV-ES reset block of OVMF's footer table (``sev_es_set_reset_vector``); none for a plain SEV guest.
    ``ovmf_table`` None: firmware loaded with ``-bios`` (no table; QEMU leaves the APs at the reset vector)."""
    if not spec.policy & Policy.ES:
        return []
    signature = cpuid_signature(cpu_model)
    ap_eip = BSP_RESET_EIP
    if ovmf_table is not None:
        info = ovmf_table.get(SEV_INFO_BLOCK_GUID)
        if info is None or len(info) < 4:
            raise EsLaunchError("SEV information block/Firmware GUID Table block not found in pflash rom")
        ap_eip = int.from_bytes(info[:4], "little")
        if not ap_eip:
            raise EsLaunchError("SEV-ES reset address is zero")
    return [reset_vmsa(BSP_RESET_EIP, signature)] + [reset_vmsa(ap_eip, signature)] * (smp - 1)


def launch_sev(ram: RAM, images: list[tuple[int, bytes]], spec: SevSpec, vmsas: list[bytes] = ()):
    """Open the SEV context for ``ram`` and measure ``images`` ((gpa, plaintext) pairs), then, for an SEV-ES guest,
    ``vmsas`` (:func:`es_vmsas`): the guest is left in launch-secret, ready for ``finish()`` (LAUNCH_FINISH) on its
    first run."""
    sev = open_sev(ram, spec)
    sev.launch(images, list(vmsas))
    return sev
