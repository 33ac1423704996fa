"""The one debug-refusal rule: whether, and why, no guest plaintext may leave.

Every front end (``x``/``info mem`` through the debug ops, the gdb stub's warning, ``info sev``'s ``debug:`` line,
``sevmon check``, the attach path's forwarding) asks here instead of testing policy bits itself, so that a new guest
type (SEV-ES, SNP: the kernel refuses their debug commands) is taught to sevmon in this one module.

Three things can refuse, checked in this order (the order decides which sentence a user sees):

1. the security-policy object (``--debug-policy off``): the host forbids debugging of any guest;
2. the guest's type: only plain SEV guests can be debugged through DBG_DECRYPT today (a hook, nothing refused yet);
3. the guest's policy: bit 0 (NODBG) makes the firmware refuse DBG_DECRYPT/DBG_ENCRYPT.
"""

from __future__ import annotations

from sevmon.sev.abi import Policy

SECURITY_POLICY = "debug access is disabled by the security policy (--debug-policy off)"

POLICY_ES = 1 << 2  #: guest policy bit 2: the guest must run SEV-ES
SEV_TYPES = ("sev", "sev-es", "sev-snp")
#: guest types whose memory cannot be debugged at all, and why (one sentence each)
TYPE_REFUSALS = {
    "sev-snp": ("the guest is an SEV-SNP guest: upstream KVM refuses the SEV debug commands (DBG_DECRYPT, "
                "DBG_ENCRYPT) for SNP guests (-EPERM), so live debugging needs a patched kernel"),
}


def sev_type(query_sev: dict) -> str:
    """The guest type from QEMU's ``query-sev`` answer: its ``sev-type`` where QEMU has one (9.1 and later:
    ``sev``, ``sev-es``, ``sev-snp``), else the policy's ES bit (QEMU 7.2 runs SEV and SEV-ES guests only)."""
    t = query_sev.get("sev-type")
    if t in SEV_TYPES:
        return t
    return "sev-es" if query_sev.get("policy", 0) & POLICY_ES else "sev"


def policy_forbids_debug(policy: int) -> bool:
    """The guest policy's NODBG bit: the firmware refuses every debug command for this guest."""
    return bool(policy & Policy.NODBG)


def guest_refusal(sev) -> str | None:
    """Why the guest itself refuses debugging (its type or its policy), or None; ``sev`` None: not an SEV guest.

    ``sev`` is anything with a ``policy`` (the VMM's :class:`sevmon.sev.vm.SevVm`, an attach mirror). A guest type
    that cannot be debugged (SEV-ES, SNP) is refused here, before its policy is looked at.
    """
    if sev is None:
        return None
    refused = TYPE_REFUSALS.get(getattr(sev, "sev_type", "sev"))
    if refused:
        return refused
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


#: why QEMU itself must not read an SEV-ES guest's memory for a command (``x /i``, ``sum``, ``migrate``...)
QEMU_READS_ES = ("the guest is an SEV-ES guest: QEMU would read its memory with the cached reset registers "
                 "(its vCPU state is encrypted in the VMSA) and see ciphertext, so sevmon does not ask it to")


def qemu_read_refusal(machine) -> str | None:
    """Why a command for which QEMU reads guest memory itself may not be passed to QEMU (attached): every reason
    debugging is refused, and, for an SEV-ES guest, QEMU's stale registers (its answer would be wrong, silently)."""
    reason = machine_refusal(machine)
    if reason is None and getattr(machine, "registers_encrypted", False):
        reason = QEMU_READS_ES
    return reason


def cbit_mask(machine) -> int:
    """The C-bit mask the page walkers strip from CR3 and every entry: 0 for a guest without SEV."""
    return machine.sev.me_mask if machine.sev is not None else 0
