"""The VMM surface (SevVm): launch and its independently verified measurement, states,
LAUNCH_SECRET end to end, ciphertext at rest, the guest's own accesses."""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sevmon.memory.ram import RAM, MemoryAccessError
from sevmon.model import SimulatedHost, SimulatedKvm
from sevmon.sev import SevError, SevVm
from sevmon.sev.abi import (
    KvmSevGuestStatus,
    KvmSevLaunchMeasure,
    KvmSevLaunchStart,
    SevCmdId,
    SevRet,
)
from tests.sev.sev_helpers import IMAGE_GPA, new_vm, raw_op

A = IMAGE_GPA


def expected_blob(vm: SevVm, digest: bytes, mnonce: bytes, tik: bytes = bytes(16)) -> bytes:
    msg = bytes([0x04, vm.api_major, vm.api_minor, vm.build_id]) + vm.policy.to_bytes(4, "little") + digest + mnonce
    return hmac.new(tik, msg, hashlib.sha256).digest() + mnonce


def test_full_launch_measurement_verifies_independently():
    bios, kernel = os.urandom(0x4000), os.urandom(0x2000)
    vm = SevVm(RAM(16 << 20), policy=0x0, kernel=SimulatedKvm())
    assert (vm.api_major, vm.api_minor, vm.build_id) == (1, 55, 25)
    assert vm.state_name == "uninit" and vm.measurement is None
    blob = vm.launch([(0xFFC000, bios), (0x200000, kernel)])
    assert len(blob) == 48 and vm.measurement == blob
    assert blob == expected_blob(vm, hashlib.sha256(bios + kernel).digest(), blob[32:])
    assert vm.state_name == "launch-secret"
    assert vm.guest_status() == (vm.handle, 0, 2)


def test_launch_digest_is_split_independent():
    data = os.urandom(0x3000)
    host = SimulatedHost()
    one = SevVm(RAM(1 << 20), kernel=SimulatedKvm(host))
    three = SevVm(RAM(1 << 20), kernel=SimulatedKvm(host))
    b1 = one.launch([(0, data)])
    b3 = three.launch([(0x8000, data[:0x10]), (0x1000, data[0x10:0x1010]), (0x50000, data[0x1010:])])
    digest = hashlib.sha256(data).digest()
    assert b1 == expected_blob(one, digest, b1[32:])
    assert b3 == expected_blob(three, digest, b3[32:])
    nonce = os.urandom(16)
    assert one.attestation_report(nonce)[16:48] == three.attestation_report(nonce)[16:48] == digest


def test_guest_status_along_the_launch():
    vm = SevVm(RAM(1 << 20), kernel=SimulatedKvm())
    k = vm.kernel
    err, _, out = raw_op(k, SevCmdId.LAUNCH_START, KvmSevLaunchStart, dict(policy=0x22))
    assert err == 0
    assert raw_op(k, SevCmdId.GUEST_STATUS, KvmSevGuestStatus, {})[2].state == 1
    err, cmd, m = raw_op(k, SevCmdId.LAUNCH_MEASURE, KvmSevLaunchMeasure, dict(uaddr=0, len=0))
    assert (err, cmd.error, m.len) == (5, SevRet.INVALID_LEN, 48)  # EIO: the length query "fails"
    buf = k.alloc(48)
    assert raw_op(k, SevCmdId.LAUNCH_MEASURE, KvmSevLaunchMeasure, dict(uaddr=buf, len=48))[0] == 0
    st = raw_op(k, SevCmdId.GUEST_STATUS, KvmSevGuestStatus, {})[2]
    assert (st.handle, st.policy, st.state) == (out.handle, 0x22, 2)
    assert raw_op(k, SevCmdId.LAUNCH_FINISH)[0] == 0
    assert raw_op(k, SevCmdId.GUEST_STATUS, KvmSevGuestStatus, {})[2].state == 3


def test_states_through_the_vmm(image):
    vm = new_vm(image)
    assert vm.guest_status()[2] == 2 and vm.state_name == "launch-secret" and vm.state_number == 2
    with pytest.raises(SevError):
        vm.launch([(0, image)])
    vm.finish()
    assert vm.guest_status()[2] == 3 and vm.state_name == "running"
    with pytest.raises(SevError) as ei:
        vm.inject_launch_secret(bytes(52), bytes(16), A)
    assert str(ei.value) == "SEV: Not in correct state. (LSECRET) 3"
    assert vm.dbg_decrypt(A, 32) == image[:32]  # debug works in every state with an ASID


def test_ciphertext_at_rest(image):
    host = SimulatedHost()
    a, b = new_vm(image, host=host), new_vm(image, host=host)
    at_rest_a, at_rest_b = a.ram.read(A, len(image)), b.ram.read(A, len(image))
    assert at_rest_a != image and at_rest_b != image and at_rest_a != at_rest_b
    assert image[:64] not in at_rest_a
    # a page holding the same plaintext twice stores two different ciphertexts
    a.dbg_encrypt(A, bytes(4096) * 2)
    assert a.ram.read(A, 4096) != a.ram.read(A + 4096, 4096)
    # ciphertext copied from another guest decrypts to garbage under this guest's key
    b.ram.write(A + 0x2000, at_rest_a[0x2000:0x3000])
    assert b.dbg_decrypt(A + 0x2000, 0x1000) != image[0x2000:0x3000]


def test_launch_secret_end_to_end(image):
    vm = new_vm(image)
    blob = vm.measurement
    secret = b"the disk passphrase: hunter2!!!!"  # 32 bytes
    iv = os.urandom(16)
    trans = Cipher(algorithms.AES(bytes(16)), modes.CTR(iv)).encryptor().update(secret)  # TEK = 0
    mac = hmac.new(bytes(16), b"\x01" + bytes(4) + iv + len(secret).to_bytes(4, "little") * 2 + trans + blob[:32],
                   hashlib.sha256).digest()                                                # TIK = 0
    header = bytes(4) + iv + mac
    gpa = 0x800000  # an untouched secret page outside the images
    vm.inject_launch_secret(header, trans, gpa)
    vm.finish()
    assert vm.guest_read(gpa, len(secret)) == secret
    assert vm.ram.read(gpa, len(secret)) != secret
    assert vm.dbg_decrypt(gpa, len(secret)) == secret


def test_launch_secret_with_a_bad_mac(image):
    vm = new_vm(image)
    with pytest.raises(SevError) as ei:
        vm.inject_launch_secret(bytes(52), bytes(32), A)
    assert (ei.value.errno, ei.value.fw_error) == (5, SevRet.BAD_MEASUREMENT)
    assert str(ei.value) == "SEV: LAUNCH_SECRET failed: Bad measurement (fw error 11)"
    with pytest.raises(SevError) as ei:
        vm.inject_launch_secret(bytes(52), bytes(20), A)
    assert ei.value.fw_error == SevRet.INVALID_LEN


def test_guest_accesses_private_and_shared(image):
    vm = new_vm(image)
    vm.finish()
    s0 = vm.stats
    vm.guest_write(0x300000, b"private data", private=True)
    vm.guest_write(0x301000, b"shared data", private=False)
    assert (vm.stats - s0).round_trips == 0 and (vm.stats - s0).firmware_calls == 0
    assert vm.ram.read(0x300000, 12) != b"private data"
    assert vm.ram.read(0x301000, 11) == b"shared data"
    assert vm.guest_read(0x300000, 12) == b"private data"
    assert vm.guest_read(0x300000, 12, private=False) != b"private data"
    assert vm.dbg_decrypt(0x300000, 12) == b"private data"
    assert vm.guest_read(A + 5, 7) == image[5:12]
    with pytest.raises(MemoryAccessError):
        vm.guest_read(0x900000, 4)
    with pytest.raises(MemoryAccessError):
        vm.guest_write(vm.ram.size - 2, b"abcd")
    fresh = SevVm(RAM(1 << 20), kernel=SimulatedKvm())
    with pytest.raises(SevError):
        fresh.guest_write(0, b"x")  # no key before LAUNCH_START/ACTIVATE


def test_vmm_side_checks():
    with pytest.raises(SevError) as ei:
        SevVm(RAM(1 << 20), cbitpos=51, kernel=SimulatedKvm())
    assert str(ei.value) == "SEV: cbitpos check failed, host '47' requested '51'"
    with pytest.raises(SevError) as ei:
        SevVm(RAM(1 << 20), reduced_phys_bits=0, kernel=SimulatedKvm())
    assert "reduced_phys_bits" in str(ei.value)
    vm = SevVm(RAM(1 << 20), cbitpos=51, kernel=SimulatedKvm(SimulatedHost(cbitpos=51)))
    assert vm.cpuid.cbitpos == 51 and vm.me_mask == 1 << 51 and vm.cpuid.reduced_phys_bits == 1
    assert vm.dbg_decrypt(0, 0) == b""
    with pytest.raises(SevError) as ei:
        vm.launch([(0, b"not a multiple of 16")])
    assert ei.value.fw_error == SevRet.INVALID_LEN


def test_attestation_report(image):
    vm = new_vm(image)
    nonce = os.urandom(16)
    rep = vm.attestation_report(nonce)
    assert len(rep) == 208 and rep[:16] == nonce and rep[16:48] == hashlib.sha256(image).digest()


def _cert_key(cert: bytes) -> ec.EllipticCurvePublicKey:
    assert int.from_bytes(cert[16:20], "little") == 2  # P-384
    x, y = int.from_bytes(cert[20:92], "little"), int.from_bytes(cert[92:164], "little")
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP384R1()).public_key()


def _verify(cert: bytes, slot: int, signer: bytes, usage: int) -> None:
    off = 0x414 + slot * 520
    assert int.from_bytes(cert[off:off + 4], "little") == usage
    assert int.from_bytes(cert[off + 4:off + 8], "little") == 2  # ECDSA-SHA256
    r, s = (int.from_bytes(cert[off + 8 + i * 72:off + 80 + i * 72], "little") for i in (0, 1))
    _cert_key(signer).verify(utils.encode_dss_signature(r, s), cert[:0x414], ec.ECDSA(hashes.SHA256()))


def test_platform_certificates_form_a_verifiable_chain():
    vm = SevVm(RAM(1 << 20), kernel=SimulatedKvm())
    s0 = vm.stats
    pdh, chain, chip_id = vm.platform_certificates()
    assert (vm.stats - s0).round_trips == 4   # two length queries, two fetches
    assert len(pdh) == 2084 and len(chain) == 3 * 2084 and len(chip_id) == 64
    pek, oca, cek = chain[:2084], chain[2084:4168], chain[4168:]
    usage = lambda c: int.from_bytes(c[8:12], "little")  # noqa: E731
    assert [usage(c) for c in (pdh, pek, oca, cek)] == [0x1003, 0x1002, 0x1001, 0x1004]
    assert all(c[:4] == b"\x01\x00\x00\x00" and c[4:6] == bytes([1, 55]) for c in (pdh, pek, oca, cek))
    _verify(oca, 0, oca, 0x1001)
    _verify(pek, 0, oca, 0x1001)
    _verify(pek, 1, cek, 0x1004)
    _verify(pdh, 0, pek, 0x1002)
    assert int.from_bytes(cek[0x414:0x418], "little") == 0x1000  # the AMD (ASK) signature is not here
    assert _cert_key(pek).public_numbers() == vm.kernel.host.psp.pek_public_key().public_numbers()
    assert vm.platform_certificates()[2] == chip_id
