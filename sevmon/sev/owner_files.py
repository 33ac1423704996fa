"""The guest owner's launch files, read as QEMU's ``sev-guest`` object reads them.

``dh-cert-file`` (the owner's DH ``sev_cert``) and ``session-file`` (the 128-byte launch
session) are base64 text files (``sev_read_file_base64``: ``g_file_get_contents`` then
glib's lenient ``g_base64_decode``). QEMU reads them only when the option is given, and
passes the session even without a certificate (the firmware then ignores it).
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from .vm import SevError


def g_base64_decode(text: str) -> bytes:
    """glib's lenient decoder: characters outside the alphabet are skipped, padding optional."""
    clean = re.sub(r"[^A-Za-z0-9+/]", "", text.split("=", 1)[0])
    clean = clean[: len(clean) - len(clean) % 4 if len(clean) % 4 == 1 else len(clean)]
    try:
        return base64.b64decode(clean + "=" * (-len(clean) % 4))
    except (binascii.Error, ValueError):
        return b""


def read_file_base64(path: str) -> bytes:
    """The decoded contents, or SevError with QEMU's text: failed to read 'F' (why)."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        verb = "read" if isinstance(e, IsADirectoryError) else "open"
        raise SevError(f"failed to read '{path}' (Failed to {verb} file \u201c{path}\u201d: "
                       f"{os.strerror(e.errno) if e.errno else e})") from None
    return g_base64_decode(text.decode("latin-1"))


def owner_launch_files(session_file: str | None, dh_cert_file: str | None) -> dict:
    """``SevVm`` keyword arguments for ``--session-file``/``--dh-cert-file`` (empty if none)."""
    out = {}
    if session_file:
        out["session"] = read_file_base64(session_file)
    if dh_cert_file:
        out["dh_cert"] = read_file_base64(dh_cert_file)
    return out
