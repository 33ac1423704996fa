"""The SEV launch, in one place for every kind of local guest.

QEMU's order: ``sev_kvm_init`` (C-bit check, platform status, KVM_SEV_INIT, RAM registered), LAUNCH_START,
LAUNCH_UPDATE_DATA over each image (firmware, pflash, or a whole loaded image), LAUNCH_MEASURE; LAUNCH_FINISH comes
on the first transition to running (under ``-S``, only on the first ``cont``), which is the machine's first run.
"""

from __future__ import annotations

from sevmon.machine.spec import SevSpec
from sevmon.memory.ram import RAM


def sev_kernel(spec: SevSpec):
    """The kernel transport: None for the simulated platform (SevVm makes one), or real /dev/kvm + /dev/sev."""
    if not spec.kvm:
        return None
    from sevmon.sev.linux import LinuxSevTransport
    return LinuxSevTransport()  # raises SevUnavailable with one sentence on hosts without SEV


def launch_sev(ram: RAM, images: list[tuple[int, bytes]], spec: SevSpec):
    """Open the SEV context for ``ram`` and measure ``images`` ((gpa, plaintext) pairs): the guest is left in
    launch-secret, ready for ``finish()`` (LAUNCH_FINISH) on its first run."""
    from sevmon.sev.vm import SevVm
    sev = SevVm(ram, policy=spec.policy, cbitpos=spec.cbitpos, reduced_phys_bits=spec.reduced_phys_bits,
                kernel=sev_kernel(spec))
    sev.launch(images)
    return sev
