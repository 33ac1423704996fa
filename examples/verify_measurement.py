#!/usr/bin/env python3
"""Verify an SEV guest's launch measurement, as the guest owner would before trusting it.

    usage: python3 verify_measurement.py QMP_SOCKET FIRMWARE_IMAGE

The firmware (PSP) hashed every page the hypervisor loaded into the guest at launch (the
launch digest) and MACed it with the guest's transport integrity key (TIK):

    MEASURE = HMAC-SHA-256(TIK, 0x04 || api_major || api_minor || build || policy (LE32)
                                 || launch_digest || MNONCE)

The owner knows what should have been loaded (here: the firmware image given to
``sevmon serve --bios FILE``), recomputes MEASURE and compares. A launch without a
Diffie-Hellman session (no ``dh-cert-file``) uses an all-zero TIK, so anyone can check it;
a real owner would use the TIK from their session. Prints OK or MISMATCH; exit status 0/1.
"""

import asyncio
import base64
import hashlib
import hmac
import sys

from qemu.qmp import QMPClient

TIK = bytes(16)  # no DH session: the transport integrity key is 16 zero bytes


async def fetch(socket_path: str) -> tuple[dict, bytes]:
    """query-sev (platform/guest parameters) and the launch measurement blob."""
    qmp = QMPClient("verify-measurement")
    await qmp.connect(socket_path)
    try:
        sev = await qmp.execute("query-sev")
        blob = await qmp.execute("query-sev-launch-measure")
    finally:
        await qmp.disconnect()
    return sev, base64.b64decode(blob["data"])  # MEASURE (32 bytes) || MNONCE (16 bytes)


def expected_measurement(sev: dict, firmware: bytes, mnonce: bytes) -> bytes:
    launch_digest = hashlib.sha256(firmware).digest()  # the only thing loaded: the firmware
    msg = (bytes([0x04, sev["api-major"], sev["api-minor"], sev["build-id"]])
           + sev["policy"].to_bytes(4, "little")
           + launch_digest
           + mnonce)
    return hmac.new(TIK, msg, hashlib.sha256).digest()


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    socket_path, firmware_path = sys.argv[1], sys.argv[2]
    with open(firmware_path, "rb") as f:
        firmware = f.read()
    sev, blob = asyncio.run(fetch(socket_path))
    measure, mnonce = blob[:32], blob[32:48]

    expected = expected_measurement(sev, firmware, mnonce)
    print(f"firmware    {firmware_path} ({len(firmware)} bytes)")
    print(f"SEV API     {sev['api-major']}.{sev['api-minor']} build {sev['build-id']}, policy {sev['policy']:#x}")
    print(f"measurement {measure.hex()}")
    print(f"expected    {expected.hex()}")
    if hmac.compare_digest(measure, expected):  # constant-time comparison
        print("OK: the guest was launched with this firmware")
        return 0
    print("MISMATCH: the guest was not launched with this firmware (or with other parameters)")
    return 1


if __name__ == "__main__":
    sys.exit(main())
