"""The guest owner's launch session (sev-api.md §3.4, §3.7), end to end on real daemons.

The owner side is built here with ``cryptography`` alone, from the PDH and chain that
``query-sev-capabilities`` returns: never with sevmon's own helpers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct
import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from tests.conftest import hmp, qmp_connect

SECRET_GPA = 0x200000
FIRMWARE = bytes(range(256)) * 256  # --bios, so the owner knows what is measured


# -- the owner's side, cryptography only --------------------------------------------------------
def cert_key(cert: bytes) -> ec.EllipticCurvePublicKey:
    x, y = int.from_bytes(cert[20:92], "little"), int.from_bytes(cert[92:164], "little")
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP384R1()).public_key()


def check_signed(cert: bytes, signer: bytes, slot: int = 0) -> None:
    sig = cert[0x414 + slot * 0x208:]
    r, s = int.from_bytes(sig[8:80], "little"), int.from_bytes(sig[80:152], "little")
    cert_key(signer).verify(utils.encode_dss_signature(r, s), cert[:0x414], ec.ECDSA(hashes.SHA256()))


def owner_cert(key: ec.EllipticCurvePrivateKey, usage: int = 0x1003, algo: int = 0x3) -> bytes:
    n = key.public_key().public_numbers()
    body = (struct.pack("<IBBxxIII", 1, 0, 0, usage, algo, 2) + n.x.to_bytes(72, "little")
            + n.y.to_bytes(72, "little") + bytes(880))
    empty_sig = struct.pack("<II", 0x1000, 0) + bytes(512)
    return body + empty_sig * 2


def nist_kdf(key: bytes, label: bytes, context: bytes = b"") -> bytes:
    msg = (1).to_bytes(4, "little") + label + b"\0" + context + (128).to_bytes(4, "little")
    return hmac.new(key, msg, hashlib.sha256).digest()[:16]


class Owner:
    def __init__(self, pdh: bytes, policy: int):
        self.key = ec.generate_private_key(ec.SECP384R1())
        self.tek, self.tik = os.urandom(16), os.urandom(16)
        self.cert = owner_cert(self.key)
        self.policy = policy
        nonce, iv = os.urandom(16), os.urandom(16)
        z = self.key.exchange(ec.ECDH(), cert_key(pdh))[::-1]  # x, little-endian as sev_cert numbers
        master = nist_kdf(z, b"sev-master-secret", nonce)
        kek, kik = nist_kdf(master, b"sev-kek"), nist_kdf(master, b"sev-kik")
        wrap = Cipher(algorithms.AES(kek), modes.CTR(iv)).encryptor().update(self.tek + self.tik)
        self.parts = dict(nonce=nonce, wrap_tk=wrap, wrap_iv=iv,
                          wrap_mac=hmac.new(kik, wrap, hashlib.sha256).digest(),
                          policy_mac=hmac.new(self.tik, policy.to_bytes(4, "little"), hashlib.sha256).digest())

    def session(self, **override) -> bytes:
        p = {**self.parts, **override}
        return p["nonce"] + p["wrap_tk"] + p["wrap_iv"] + p["wrap_mac"] + p["policy_mac"]

    def expected(self, sev: dict, mnonce: bytes) -> bytes:
        msg = (bytes([4, sev["api-major"], sev["api-minor"], sev["build-id"]]) + sev["policy"].to_bytes(4, "little")
               + hashlib.sha256(FIRMWARE).digest() + mnonce)
        return hmac.new(self.tik, msg, hashlib.sha256).digest()

    def secret_packet(self, secret: bytes, measure: bytes, tik: bytes | None = None) -> tuple[bytes, bytes]:
        iv = os.urandom(16)
        trans = Cipher(algorithms.AES(self.tek), modes.CTR(iv)).encryptor().update(secret)
        msg = b"\x01" + bytes(4) + iv + len(secret).to_bytes(4, "little") * 2 + trans + measure
        return bytes(4) + iv + hmac.new(tik or self.tik, msg, hashlib.sha256).digest(), trans


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def platform(make_daemon, tmp_path):
    """(platform file, pdh, chain): the PDH fetched as an owner does, from a daemon on that machine."""
    path = tmp_path / "platform.json"
    d = make_daemon("--sev-platform", str(path), subdir="fetch")
    q = qmp_connect(d)
    caps = q.cmd_obj({"execute": "query-sev-capabilities"})["return"]
    q.close()
    d.stop()
    pdh, chain = base64.b64decode(caps["pdh"]), base64.b64decode(caps["cert-chain"])
    pek, oca = chain[:2084], chain[2084:4168]
    check_signed(pdh, pek)  # PDH signed by the PEK, PEK by the OCA: the chain holds together
    check_signed(pek, oca)
    check_signed(oca, oca)
    return path, pdh


def write_files(tmp_path, cert: bytes, session: bytes):
    c, s = tmp_path / "godh.b64", tmp_path / "session.b64"
    c.write_text(base64.b64encode(cert).decode())
    s.write_text(base64.b64encode(session).decode())
    bios = tmp_path / "bios.bin"
    bios.write_bytes(FIRMWARE)
    return ["--dh-cert-file", str(c), "--session-file", str(s), "--bios", str(bios)]


def serve_fails(tmp_path, *args) -> str:
    p = subprocess.run([sys.executable, "-m", "sevmon", "serve", "--qmp", str(tmp_path / "x.sock"), *args],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    return p.stderr.strip()


# -- tests --------------------------------------------------------------------------------------
def test_owner_session_keys_measurement_and_secret(platform, make_daemon, tmp_path):
    path, pdh = platform
    owner = Owner(pdh, policy=0x0)
    d = make_daemon("--sev-platform", str(path), "-S", *write_files(tmp_path, owner.cert, owner.session()))
    q = qmp_connect(d)
    try:
        sev = q.cmd_obj({"execute": "query-sev"})["return"]
        blob = base64.b64decode(q.cmd_obj({"execute": "query-sev-launch-measure"})["return"]["data"])
        measure, mnonce = blob[:32], blob[32:]
        assert measure == owner.expected(sev, mnonce)  # keyed with the owner's TIK...
        zero = hmac.new(bytes(16), bytes([4, sev["api-major"], sev["api-minor"], sev["build-id"]]) + bytes(4)
                        + hashlib.sha256(FIRMWARE).digest() + mnonce, hashlib.sha256).digest()
        assert measure != zero                           # ...not the zero TIK of a launch without session

        secret = b"the owner's disk key, 32 bytes!!"
        before = hmp(q, f"xp /4xg {SECRET_GPA:#x}")
        hdr, trans = owner.secret_packet(secret, measure, tik=os.urandom(16))  # wrong MAC key
        r = q.cmd_obj({"execute": "sev-inject-launch-secret", "arguments": {
            "packet-header": base64.b64encode(hdr).decode(), "secret": base64.b64encode(trans).decode(),
            "gpa": SECRET_GPA}})
        assert r["error"]["desc"] == "SEV: failed to inject secret ret=-1 fw_error=11 'Bad measurement'"
        assert hmp(q, f"xp /4xg {SECRET_GPA:#x}") == before  # nothing written

        hdr, trans = owner.secret_packet(secret, measure)
        r = q.cmd_obj({"execute": "sev-inject-launch-secret", "arguments": {
            "packet-header": base64.b64encode(hdr).decode(), "secret": base64.b64encode(trans).decode(),
            "gpa": SECRET_GPA}})
        assert r == {"return": {}}
        assert q.cmd_obj({"execute": "cont"}) == {"return": {}}
        assert q.cmd_obj({"execute": "query-sev"})["return"]["state"] == "running"
        words = hmp(q, f"xp /4xg {SECRET_GPA:#x}").replace("\r", "").split()
        values = [int(w, 16) for w in words if w.startswith("0x")]
        assert b"".join(v.to_bytes(8, "little") for v in values) == secret
    finally:
        q.close()


def _pdh_of_other_platform(make_daemon):
    d = make_daemon(subdir="other")
    q = qmp_connect(d)
    pdh = base64.b64decode(q.cmd_obj({"execute": "query-sev-capabilities"})["return"]["pdh"])
    q.close()
    d.stop()
    return pdh


@pytest.mark.parametrize("case,fw", [
    ("cert-usage", 6), ("cert-not-on-curve", 6), ("cert-version", 6),
    ("wrap-mac", 11), ("wrap-tk", 11), ("policy-mac", 11), ("other-platform", 11),
    ("session-short", 4),
])
def test_tampered_session_fails_in_its_place(platform, make_daemon, tmp_path, case, fw):
    path, pdh = platform
    owner = Owner(_pdh_of_other_platform(make_daemon) if case == "other-platform" else pdh, policy=0x0)
    cert, session, policy = owner.cert, owner.session(), "0x0"
    if case == "cert-usage":
        cert = owner_cert(owner.key, usage=0x1001)
    elif case == "cert-not-on-curve":
        cert = cert[:20] + bytes([cert[20] ^ 1]) + cert[21:]
    elif case == "cert-version":
        cert = b"\x02" + cert[1:]
    elif case == "wrap-mac":
        session = owner.session(wrap_mac=bytes(32))
    elif case == "wrap-tk":
        session = owner.session(wrap_tk=bytes([owner.parts["wrap_tk"][0] ^ 1]) + owner.parts["wrap_tk"][1:])
    elif case == "policy-mac":
        policy = "0x1"  # the host launches with a policy the owner did not MAC
    elif case == "session-short":
        session = session[:127]
    err = serve_fails(tmp_path, "--sev-platform", str(path), "--policy", policy,
                      *write_files(tmp_path, cert, session))
    text = {4: "Buffer too small", 6: "Certificate is invalid", 11: "Bad measurement"}[fw]
    assert err.endswith(f"sev_launch_start: LAUNCH_START ret=-1 fw_error={fw} '{text}'"), err


def test_unreadable_owner_file_in_qemus_words(tmp_path):
    missing = tmp_path / "nope.b64"
    err = serve_fails(tmp_path, "--dh-cert-file", str(missing))
    assert err.endswith(f"failed to read '{missing}' (Failed to open file \u201c{missing}\u201d: "
                        "No such file or directory)"), err


def test_channel_checks_in_firmware_order():
    """The firmware model's own answer for each broken part, with the reason (not visible over QMP)."""
    from sevmon.model.channel import ChannelError, open_server
    pdh = ec.generate_private_key(ec.SECP384R1())
    n = pdh.public_key().public_numbers()
    pdh_cert = bytes(20) + n.x.to_bytes(72, "little") + n.y.to_bytes(72, "little")
    owner = Owner(pdh_cert, policy=0x5)
    assert open_server(pdh, owner.cert, owner.session(), 0x5) == (owner.tek, owner.tik)
    for session, policy, why in [
            (owner.session(wrap_mac=bytes(32)), 0x5, "WRAP_MAC"),
            (owner.session(), 0x4, "POLICY_MAC")]:
        with pytest.raises(ChannelError, match=why) as e:
            open_server(pdh, owner.cert, session, policy)
        assert e.value.status == 11
