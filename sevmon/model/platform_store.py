"""The simulated platform's persistent identity (``--sev-platform FILE``).

A real PSP keeps its OCA/PEK/PDH keys in non-volatile storage and its CEK and chip id in
fuses, so a guest owner can fetch the PDH (``query-sev-capabilities``), build a launch
session for it, and start a VM later on the same machine. Each sevmon daemon otherwise
models a fresh platform; with ``--sev-platform FILE`` the keys are created on first use,
stored in FILE (mode 0600, PEM keys in JSON) and reused by every daemon given that FILE.
Two files are two machines (a migration source and target).
"""

from __future__ import annotations

import json
import os

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

_KEYS = ("cek", "oca", "pek", "pdh")


def load_or_create(path: str, psp) -> None:
    """Give ``psp`` (a SevFirmware) the identity stored in ``path``, creating it if absent."""
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
        keys = {k: serialization.load_pem_private_key(data[k].encode(), None) for k in _KEYS}
        if not all(isinstance(v, ec.EllipticCurvePrivateKey) for v in keys.values()):
            raise ValueError(f"{path}: not a sevmon platform file")
        psp.restore_identity(chip_id=bytes.fromhex(data["chip_id"]), **keys)
        return
    ident = psp.identity()
    data = {"chip_id": ident.chip_id.hex()}
    for k in _KEYS:
        data[k] = getattr(ident, k).private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()).decode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
