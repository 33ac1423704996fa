"""The SEV launch, in one place for every kind of local guest.

QEMU's order: ``sev_kvm_init`` (C-bit check, platform status, KVM_SEV_INIT, RAM registered), LAUNCH_START (with
the guest owner's DH certificate and session when given), LAUNCH_UPDATE_DATA over each image (firmware, pflash
unit 0, or a whole loaded image), LAUNCH_MEASURE; LAUNCH_FINISH comes on the first transition to running (under
``-S``, only on the first ``cont``), which is the machine's first run. A migration target opens the context the same
way but receives its guest (RECEIVE_*) instead of launching one.
"""

from __future__ import annotations

from sevmon.machine.spec import SevSpec
from sevmon.memory.ram import RAM


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
    host = SimulatedHost(cbitpos=spec.cbitpos, reduced_phys_bits=max(spec.reduced_phys_bits, 0))
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


def launch_sev(ram: RAM, images: list[tuple[int, bytes]], spec: SevSpec):
    """Open the SEV context for ``ram`` and measure ``images`` ((gpa, plaintext) pairs): the guest is left in
    launch-secret, ready for ``finish()`` (LAUNCH_FINISH) on its first run."""
    sev = open_sev(ram, spec)
    sev.launch(images)
    return sev
