"""SEND_*/RECEIVE_* through the simulated kernel and firmware (sev-api.md §3.9), two platforms."""

from __future__ import annotations

import pytest

from sevmon.memory.ram import RAM
from sevmon.model import SimulatedKvm
from sevmon.sev import migration_vmm as mig
from sevmon.sev.vm import SevError, SevVm

GPAS = (0x1000, 0x2000, 0x3000)


def _pair(image: bytes, policy: int = 0):
    src = SevVm(RAM(1 << 20), policy=policy, kernel=SimulatedKvm())
    src.launch([(GPAS[0], image)])
    src.finish()
    dst = SevVm(RAM(1 << 20), kernel=SimulatedKvm())  # another host: its own PSP, PDH and keys
    return src, dst


def test_pages_move_under_transport_keys(image):
    image = image[:3 * 4096]
    src, dst = _pair(image)
    pdh, chain, _ = dst.platform_certificates()
    session, policy = mig.send_start(src, pdh, chain, b"")
    assert (len(session), policy, src.state_name) == (128, 0, "send-update")
    mig.receive_start(dst, src.platform_certificates()[0], session, policy)
    assert dst.state_name == "receive-update" and dst.handle
    for gpa in GPAS:
        hdr, trans = mig.send_page(src, gpa)
        assert trans != src.ram.read(gpa, 4096) and trans != image[gpa - GPAS[0]:][:4096]
        mig.receive_page(dst, gpa, hdr, trans)
    mig.send_finish(src)
    mig.receive_finish(dst)
    assert dst.state_name == "running" and dst.guest_status()[2] == 3
    assert dst.dbg_decrypt(GPAS[0], len(image)) == image           # same plaintext
    assert dst.ram.read(GPAS[0], 4096) != src.ram.read(GPAS[0], 4096)  # other key, other ciphertext


def test_tampered_or_foreign_packet_is_refused_and_writes_nothing(image):
    src, dst = _pair(image[:4096])
    pdh, chain, _ = dst.platform_certificates()
    session, policy = mig.send_start(src, pdh, chain, b"")
    mig.receive_start(dst, src.platform_certificates()[0], session, policy)
    hdr, trans = mig.send_page(src, GPAS[0])
    bad = bytes([trans[0] ^ 1]) + trans[1:]
    with pytest.raises(SevError, match="RECEIVE_UPDATE_DATA ret=-1 fw_error=11 'Bad measurement'"):
        mig.receive_page(dst, GPAS[0], hdr, bad)
    assert not dst.ram.has(GPAS[0] >> 12)
    mig.send_finish(src, cancel=True)  # SEND_CANCEL: the source runs on
    assert src.state_name == "running"
    assert src.dbg_decrypt(GPAS[0], 4096) == image[:4096]


@pytest.mark.parametrize("policy,what", [(0x8, "NOSEND"), (0x10, "DOMAIN"), (0x20, "SEV"),
                                         (0x02FF0000, "API major 255")])
def test_send_start_policy_checks(image, policy, what):
    src, dst = _pair(image[:4096], policy=policy)
    pdh, chain, _ = dst.platform_certificates()
    with pytest.raises(SevError, match="SEND_START ret=-1 fw_error=7 'Policy is not allowed'"):
        mig.send_start(src, pdh, chain, b"")
    assert src.state_name == "running"


def test_send_start_checks_the_target_chain(image):
    src, dst = _pair(image[:4096])
    pdh, chain, _ = dst.platform_certificates()
    other_pdh = SevVm(RAM(1 << 16), kernel=SimulatedKvm()).platform_certificates()[0]
    with pytest.raises(SevError, match="fw_error=10"):  # PDH not signed by this chain's PEK
        mig.send_start(src, other_pdh, chain, b"")
    with pytest.raises(SevError, match="fw_error=6"):
        mig.send_start(src, bytes(2084), chain, b"")
    assert src.state_name == "running"


def test_receive_start_with_a_session_for_another_platform(image):
    src, dst = _pair(image[:4096])
    third = SevVm(RAM(1 << 16), kernel=SimulatedKvm())
    pdh, chain, _ = third.platform_certificates()
    session, policy = mig.send_start(src, pdh, chain, b"")  # wrapped for `third`, not `dst`
    with pytest.raises(SevError, match="RECEIVE_START ret=-1 fw_error=11"):
        mig.receive_start(dst, src.platform_certificates()[0], session, policy)
