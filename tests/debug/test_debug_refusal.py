"""The one debug-refusal rule: which sentence refuses, in which order, for every front end.

Front ends (``x``, ``info mem``, the gdb stub, ``info sev``, ``sevmon check``) are tested end to end elsewhere; this
pins the rule they all ask, so that a change of wording or order shows here first.
"""

from __future__ import annotations

from types import SimpleNamespace

from sevmon.debug.refusal import SECURITY_POLICY, cbit_mask, debug_refusal, policy_forbids_debug


def test_security_policy_refuses_any_guest_before_its_policy():
    assert debug_refusal(None, security_allowed=False) == SECURITY_POLICY
    assert debug_refusal(SimpleNamespace(policy=0x1), security_allowed=False) == SECURITY_POLICY


def test_nodbg_refuses_with_the_policy_it_found():
    assert debug_refusal(SimpleNamespace(policy=0x5)) == (
        "the SEV guest policy 0x5 forbids debug access (NODBG): guest memory cannot be decrypted")
    assert policy_forbids_debug(0x1) and not policy_forbids_debug(0x2)


def test_debug_allowed_without_sev_or_with_policy_0():
    assert debug_refusal(None) is None
    assert debug_refusal(SimpleNamespace(policy=0x0)) is None


def test_cbit_mask_is_zero_without_sev():
    assert cbit_mask(SimpleNamespace(sev=None)) == 0
    assert cbit_mask(SimpleNamespace(sev=SimpleNamespace(me_mask=1 << 47))) == 1 << 47


def test_guest_type_from_query_sev_and_the_snp_refusal():
    from sevmon.debug.refusal import TYPE_REFUSALS, sev_type

    assert sev_type({"enabled": True, "policy": 0x1}) == "sev"
    assert sev_type({"enabled": True, "policy": 0x5}) == "sev-es"          # QEMU 7.2: the policy's ES bit
    assert sev_type({"enabled": True, "sev-type": "sev-snp", "snp-policy": 0x30000}) == "sev-snp"
    snp = SimpleNamespace(policy=0, sev_type="sev-snp")
    assert debug_refusal(snp) == TYPE_REFUSALS["sev-snp"] and "-EPERM" in debug_refusal(snp)
    assert debug_refusal(snp, security_allowed=False) == SECURITY_POLICY
