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


def test_sev_es_is_debuggable_unless_nodbg_and_snp_is_not():
    from sevmon.debug.refusal import sev_type
    assert sev_type(SimpleNamespace(policy=0x4)) == "sev-es" and debug_refusal(SimpleNamespace(policy=0x4)) is None
    assert sev_type(SimpleNamespace(policy=0x1)) == "sev"
    assert debug_refusal(SimpleNamespace(policy=0x4, snp=True)).startswith("an SEV-SNP guest's memory")
