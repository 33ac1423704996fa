#!/usr/bin/env python3
"""Play the SEV guest owner end to end: the owner, not the host, holds the launch keys.

    usage: python3 guest_owner.py WORKDIR

1. Fetch the platform's PDH and certificate chain (``query-sev-capabilities``) from a
   daemon on the "machine" (``--sev-platform WORKDIR/platform.json``), check the chain.
2. Build the launch session with the owner's own P-384 key: ECDH with the PDH, the NIST
   KDF, fresh TEK/TIK wrapped under the KEK, MACs under the KIK and the TIK.
3. Start ``sevmon serve -S --dh-cert-file ... --session-file ...`` (QEMU's sev-guest
   properties): the firmware opens the channel at LAUNCH_START.
4. Verify the launch measurement with the owner's TIK (only the owner can).
5. Inject a secret wrapped under the TEK and MACed with the TIK (``sev-inject-launch-secret``).
6. ``cont``: LAUNCH_FINISH, the guest runs.
7. Read the secret back through debug access (the guest policy 0x0 allows it).

Needs ``cryptography`` and ``qemu.qmp``. Prints each step; exit status 0 if all hold.
"""

import asyncio
import base64
import hashlib
import hmac
import os
import struct
import subprocess
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from qemu.qmp import ConnectError, QMPClient

POLICY = 0x0          # debugging allowed, so step 7 can read the secret back
SECRET_GPA = 0x200000
SECRET = b"owner's disk passphrase: hunter2"  # a multiple of 16 bytes, as the firmware wants


# -- sev_cert and the session, with cryptography only ------------------------------------------
def cert_key(cert: bytes) -> ec.EllipticCurvePublicKey:
    """The P-384 key of a 2084-byte sev_cert (coordinates little-endian)."""
    x, y = int.from_bytes(cert[20:92], "little"), int.from_bytes(cert[92:164], "little")
    return ec.EllipticCurvePublicNumbers(x, y, ec.SECP384R1()).public_key()


def verify_signed_by(cert: bytes, signer: bytes) -> None:
    """Signature slot 0 (r, s little-endian) over the first 0x414 bytes, ECDSA-SHA256."""
    r, s = int.from_bytes(cert[0x41C:0x464], "little"), int.from_bytes(cert[0x464:0x4AC], "little")
    cert_key(signer).verify(utils.encode_dss_signature(r, s), cert[:0x414], ec.ECDSA(hashes.SHA256()))


def make_cert(key: ec.EllipticCurvePrivateKey) -> bytes:
    """The owner's DH certificate: usage PDH (0x1003), ECDH-SHA256 (3), P-384 (2), unsigned."""
    n = key.public_key().public_numbers()
    body = (struct.pack("<IBBxxIII", 1, 0, 0, 0x1003, 3, 2) + n.x.to_bytes(72, "little")
            + n.y.to_bytes(72, "little") + bytes(880))
    return body + (struct.pack("<II", 0x1000, 0) + bytes(512)) * 2


def kdf(key: bytes, label: bytes, context: bytes = b"") -> bytes:
    """NIST SP 800-108 counter mode, HMAC-SHA-256, one 128-bit block."""
    return hmac.new(key, struct.pack("<I", 1) + label + b"\0" + context + struct.pack("<I", 128),
                    hashlib.sha256).digest()[:16]


def build_session(pdh: bytes, policy: int):
    """(owner cert, 128-byte session, TEK, TIK)."""
    key = ec.generate_private_key(ec.SECP384R1())
    tek, tik, nonce, iv = (os.urandom(16) for _ in range(4))
    z = key.exchange(ec.ECDH(), cert_key(pdh))[::-1]  # shared x, little-endian like every sev_cert number
    master = kdf(z, b"sev-master-secret", nonce)
    kek, kik = kdf(master, b"sev-kek"), kdf(master, b"sev-kik")
    wrap_tk = Cipher(algorithms.AES(kek), modes.CTR(iv)).encryptor().update(tek + tik)
    session = (nonce + wrap_tk + iv + hmac.new(kik, wrap_tk, hashlib.sha256).digest()
               + hmac.new(tik, struct.pack("<I", policy), hashlib.sha256).digest())
    return make_cert(key), session, tek, tik


def package_secret(secret: bytes, measure: bytes, tek: bytes, tik: bytes) -> tuple[bytes, bytes]:
    """LAUNCH_SECRET's packet header {flags, iv, mac} and the secret encrypted under the TEK."""
    iv = os.urandom(16)
    trans = Cipher(algorithms.AES(tek), modes.CTR(iv)).encryptor().update(secret)
    msg = b"\x01" + struct.pack("<I", 0) + iv + struct.pack("<II", len(secret), len(trans)) + trans + measure
    return struct.pack("<I", 0) + iv + hmac.new(tik, msg, hashlib.sha256).digest(), trans


# -- the daemons --------------------------------------------------------------------------------
async def start(sock: str, *args: str):
    daemon = subprocess.Popen([sys.executable, "-m", "sevmon", "serve", "--qmp", sock, *args],
                              stderr=subprocess.PIPE, text=True)
    qmp = QMPClient("guest-owner")
    for _ in range(300):
        try:
            await qmp.connect(sock)
            return daemon, qmp
        except ConnectError:
            if daemon.poll() is not None:
                raise SystemExit(f"sevmon serve failed: {daemon.stderr.read().strip()}") from None
            await asyncio.sleep(0.1)
    raise SystemExit("sevmon serve did not start")


async def stop(daemon, qmp) -> None:
    await qmp.disconnect()
    daemon.terminate()
    daemon.wait()


async def main(workdir: str) -> int:
    platform = os.path.join(workdir, "platform.json")
    firmware = os.path.join(workdir, "firmware.bin")
    with open(firmware, "wb") as f:
        f.write(b"the owner's firmware image".ljust(64, b"\0") * 1024)  # 64 KiB the owner knows

    # 1. the platform's PDH and chain
    daemon, qmp = await start(os.path.join(workdir, "fetch.sock"), "--sev-platform", platform)
    caps = await qmp.execute("query-sev-capabilities")
    await stop(daemon, qmp)
    pdh, chain = base64.b64decode(caps["pdh"]), base64.b64decode(caps["cert-chain"])
    pek, oca = chain[:2084], chain[2084:4168]
    verify_signed_by(pdh, pek)
    verify_signed_by(pek, oca)
    verify_signed_by(oca, oca)
    print("1. PDH fetched; chain PDH <- PEK <- OCA verifies")

    # 2. the session, with the owner's own key
    cert, session, tek, tik = build_session(pdh, POLICY)
    files = {"godh.b64": cert, "session.b64": session}
    for name, blob in files.items():
        with open(os.path.join(workdir, name), "w") as f:
            f.write(base64.b64encode(blob).decode())
    print("2. session built: TEK/TIK wrapped for this platform's PDH")

    # 3. launch with it, frozen before the first instruction
    daemon, qmp = await start(os.path.join(workdir, "qmp.sock"), "--sev-platform", platform, "-S",
                              "--policy", hex(POLICY), "--bios", firmware,
                              "--dh-cert-file", os.path.join(workdir, "godh.b64"),
                              "--session-file", os.path.join(workdir, "session.b64"))
    try:
        sev = await qmp.execute("query-sev")
        print(f"3. launched under -S: state {sev['state']}, policy {sev['policy']:#x}")

        # 4. the measurement, with the owner's TIK
        blob = base64.b64decode((await qmp.execute("query-sev-launch-measure"))["data"])
        measure, mnonce = blob[:32], blob[32:48]
        with open(firmware, "rb") as f:
            digest = hashlib.sha256(f.read()).digest()
        msg = (bytes([4, sev["api-major"], sev["api-minor"], sev["build-id"]]) + struct.pack("<I", sev["policy"])
               + digest + mnonce)
        if not hmac.compare_digest(measure, hmac.new(tik, msg, hashlib.sha256).digest()):
            print("4. MISMATCH: not my firmware, not my session, or not this platform")
            return 1
        print("4. measurement verified with my TIK")

        # 5. the secret
        header, trans = package_secret(SECRET, measure, tek, tik)
        await qmp.execute("sev-inject-launch-secret", {"packet-header": base64.b64encode(header).decode(),
                                                       "secret": base64.b64encode(trans).decode(),
                                                       "gpa": SECRET_GPA})
        print(f"5. secret injected at gpa {SECRET_GPA:#x}")

        # 6. run
        await qmp.execute("cont")
        print(f"6. cont: state {(await qmp.execute('query-sev'))['state']}")

        # 7. read it back through DBG_DECRYPT
        text = await qmp.execute("human-monitor-command", {"command-line": f"xp /{len(SECRET) // 8}xg {SECRET_GPA:#x}"})
        words = [int(w, 16) for w in text.split() if w.startswith("0x")]
        back = b"".join(struct.pack("<Q", w) for w in words)
        print(f"7. read back: {back!r}")
        return 0 if back == SECRET else 1
    finally:
        await stop(daemon, qmp)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(main(sys.argv[1])))
