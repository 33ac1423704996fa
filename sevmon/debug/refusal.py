"""The one debug-refusal rule: whether, and why, no guest plaintext may leave.

Every front end (``x``/``info mem`` through the debug ops, the gdb stub's warning, ``info sev``'s ``debug:`` line,
``sevmon check``, the attach path's forwarding) asks here instead of testing policy bits itself, so that a new guest
type (SEV-ES, SNP: the kernel refuses their debug commands) is taught to sevmon in this one module.

Three things can refuse, checked in this order (the order decides which sentence a user sees):

1. the security-policy object (``--debug-policy off``): the host forbids debugging of any guest;
2. the guest's type (:func:`sev_type`): SEV and SEV-ES guests are debugged through DBG_DECRYPT/DBG_ENCRYPT (the
   firmware serves both; an SEV-ES guest's *registers* are another matter, see :mod:`sevmon.x86.cpu`); an SNP
   guest would be refused here (its memory is read through other commands), but sevmon launches none;
3. the guest's policy: bit 0 (NODBG) makes the firmware refuse DBG_DECRYPT/DBG_ENCRYPT, for SEV and SEV-ES alike.
"""

from __future__ import annotations

from sevmon.sev.abi import Policy

SECURITY_POLICY = "debug access is disabled by the security policy (--debug-policy off)"


def policy_forbids_debug(policy: int) -> bool:
    """The guest policy's NODBG bit: the firmware refuses every debug command for this guest."""
    return bool(policy & Policy.NODBG)


def sev_type(sev) -> str:
    """The guest's SEV generation in QEMU's ``SevGuestType`` words: ``sev``, ``sev-es`` (policy bit 2) or
    ``sev-snp`` (an SNP guest object says so with a true ``snp`` attribute)."""
    if getattr(sev, "snp", False):
        return "sev-snp"
    return "sev-es" if sev.policy & Policy.ES else "sev"


def guest_refusal(sev) -> str | None:
    """Why the guest itself refuses debugging (its type or its policy), or None; ``sev`` None: not an SEV guest.

    ``sev`` is anything with a ``policy`` (the VMM's :class:`sevmon.sev.vm.SevVm`, an attach mirror). A guest type
    that cannot be debugged (SNP) is refused here, before its policy is looked at; SEV-ES is not refused.
    """
    if sev is None:
        return None
    if sev_type(sev) == "sev-snp":
        return "an SEV-SNP guest's memory cannot be decrypted through SEV's debug commands (DBG_DECRYPT)"
    if policy_forbids_debug(sev.policy):
        return (f"the SEV guest policy 0x{sev.policy:x} forbids debug access (NODBG): "
                "guest memory cannot be decrypted")
    return None


def debug_refusal(sev, *, security_allowed: bool = True) -> str | None:
    """The one sentence (shown after ``Error: ``) that refuses debug access, or None when it is allowed."""
    if not security_allowed:
        return SECURITY_POLICY
    return guest_refusal(sev)


def machine_refusal(machine) -> str | None:
    """What a front end asks of a machine: the refusal its debug layer applies to every read and write."""
    return machine.memory.ops.refusal


def cbit_mask(machine) -> int:
    """The C-bit mask the page walkers strip from CR3 and every entry: 0 for a guest without SEV."""
    return machine.sev.me_mask if machine.sev is not None else 0
