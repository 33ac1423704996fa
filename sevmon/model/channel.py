"""The firmware's trusted channel: ECDH with a peer's DH certificate, then TEK/TIK (§3.4).

Firmware side only (AMD-ASPFW ``sev_channel.c``): the guest owner at LAUNCH_START, and
later a migration peer, sends a P-384 DH certificate in ``sev_cert`` format and a 128-byte
session ``{nonce, wrap_tk, wrap_iv, wrap_mac, policy_mac}``. The firmware

1. checks the certificate (version 1, usage PDH, algorithm ECDH-SHA256, a valid P-384
   point) -> ``INVALID_CERTIFICATE``;
2. computes the ECDH shared x-coordinate with its PDH private key. The firmware hands it
   to the KDF little-endian (the CCP's big-endian output is reversed, ``ecdh.c``), as
   every ``sev_cert`` number is little-endian;
3. derives, with the NIST SP 800-108 counter-mode KDF (HMAC-SHA-256, ``i`` and ``L`` as
   u32 little-endian, label, a 0x00 separator, context), master = KDF(z,
   "sev-master-secret", nonce), KEK = KDF(master, "sev-kek"), KIK = KDF(master, "sev-kik");
4. checks ``wrap_mac = HMAC-SHA-256(KIK, wrap_tk)`` -> ``BAD_MEASUREMENT``;
5. unwraps ``TEK || TIK = AES-128-CTR(KEK, wrap_iv)(wrap_tk)``;
6. checks ``policy_mac = HMAC-SHA-256(TIK, policy LE32)`` -> ``BAD_MEASUREMENT``.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sevmon.sev.abi import (
    CERT_ALGO_ECDH_SHA256,
    CERT_CURVE_P384,
    CERT_USAGE_PDH,
    SESSION_LEN,
    SEV_CERT_LEN,
    SevRet,
)

LABEL_MASTER = b"sev-master-secret"
LABEL_KEK = b"sev-kek"
LABEL_KIK = b"sev-kik"


class ChannelError(Exception):
    """The channel cannot be opened; ``status`` is the firmware's answer."""

    def __init__(self, status: SevRet, why: str):
        super().__init__(why)
        self.status = status


@dataclass(frozen=True)
class Session:
    nonce: bytes
    wrap_tk: bytes
    wrap_iv: bytes
    wrap_mac: bytes
    policy_mac: bytes

    @classmethod
    def parse(cls, blob: bytes) -> Session:
        assert len(blob) == SESSION_LEN
        return cls(blob[0:16], blob[16:48], blob[48:64], blob[64:96], blob[96:128])


def kdf(key: bytes, label: bytes, context: bytes = b"", size: int = 16) -> bytes:
    """NIST SP 800-108 KDF in counter mode with HMAC-SHA-256, as the SEV firmware runs it."""
    out, i = b"", 1
    while len(out) < size:
        msg = struct.pack("<I", i) + label + b"\0" + context + struct.pack("<I", size * 8)
        out += hmac.new(key, msg, hashlib.sha256).digest()
        i += 1
    return out[:size]


def cert_public_key(cert: bytes) -> ec.EllipticCurvePublicKey:
    """The P-384 key of a DH ``sev_cert`` the firmware accepts (ChannelError otherwise)."""
    if len(cert) != SEV_CERT_LEN:
        raise ChannelError(SevRet.INVALID_LEN, "the DH certificate is not a 2084-byte sev_cert")
    version, usage, algo, curve = struct.unpack_from("<I4xIII", cert, 0)
    if version != 1:
        raise ChannelError(SevRet.INVALID_CERTIFICATE, f"certificate version {version}, not 1")
    if usage != CERT_USAGE_PDH or algo != CERT_ALGO_ECDH_SHA256:
        raise ChannelError(SevRet.INVALID_CERTIFICATE, "not a PDH (ECDH-SHA256) certificate")
    if curve != CERT_CURVE_P384:
        raise ChannelError(SevRet.INVALID_CERTIFICATE, f"curve {curve} is not P-384")
    x = int.from_bytes(cert[20:92], "little")
    y = int.from_bytes(cert[92:164], "little")
    try:
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP384R1()).public_key()
    except ValueError:
        raise ChannelError(SevRet.INVALID_CERTIFICATE, "the public key is not a P-384 point") from None


def shared_secret(private: ec.EllipticCurvePrivateKey, peer: ec.EllipticCurvePublicKey) -> bytes:
    """ECDH x-coordinate, little-endian (what the firmware feeds the KDF)."""
    return private.exchange(ec.ECDH(), peer)[::-1]


def open_server(pdh: ec.EllipticCurvePrivateKey, dh_cert: bytes, session_blob: bytes,
                policy: int) -> tuple[bytes, bytes]:
    """LAUNCH_START / RECEIVE_START with a peer's cert: ``(TEK, TIK)`` or ChannelError."""
    peer = cert_public_key(dh_cert)
    s = Session.parse(session_blob)
    master = kdf(shared_secret(pdh, peer), LABEL_MASTER, s.nonce)
    kek, kik = kdf(master, LABEL_KEK), kdf(master, LABEL_KIK)
    if not hmac.compare_digest(hmac.new(kik, s.wrap_tk, hashlib.sha256).digest(), s.wrap_mac):
        raise ChannelError(SevRet.BAD_MEASUREMENT, "WRAP_MAC does not match the wrapped transport keys")
    keys = Cipher(algorithms.AES(kek), modes.CTR(s.wrap_iv)).decryptor().update(s.wrap_tk)
    tek, tik = keys[:16], keys[16:]
    if not hmac.compare_digest(hmac.new(tik, struct.pack("<I", policy), hashlib.sha256).digest(), s.policy_mac):
        raise ChannelError(SevRet.BAD_MEASUREMENT, "POLICY_MAC does not match the guest policy")
    return tek, tik


def open_client(own_pdh: ec.EllipticCurvePrivateKey, peer_pdh: ec.EllipticCurvePublicKey, policy: int,
                rng) -> tuple[bytes, bytes, bytes]:
    """SEND_START's side (``sev_channel_open_client``): fresh TEK/TIK and the 128-byte session
    that carries them, wrapped for the peer's PDH. Returns ``(session, TEK, TIK)``."""
    tek, tik, nonce, iv = rng(16), rng(16), rng(16), rng(16)
    master = kdf(shared_secret(own_pdh, peer_pdh), LABEL_MASTER, nonce)
    kek, kik = kdf(master, LABEL_KEK), kdf(master, LABEL_KIK)
    wrap_tk = Cipher(algorithms.AES(kek), modes.CTR(iv)).encryptor().update(tek + tik)
    session = (nonce + wrap_tk + iv + hmac.new(kik, wrap_tk, hashlib.sha256).digest()
               + hmac.new(tik, struct.pack("<I", policy), hashlib.sha256).digest())
    return session, tek, tik


def packet_mac(tik: bytes, ctx: int, flags: int, iv: bytes, length: int, data: bytes) -> bytes:
    """``sev_channel_hmac`` for DATA/SECRET packets: HMAC(TIK, ctx||flags||iv||len||len||data)."""
    msg = bytes((ctx,)) + struct.pack("<I", flags) + iv + struct.pack("<II", length, len(data)) + data
    return hmac.new(tik, msg, hashlib.sha256).digest()
