"""The guest owner's launch files, read as QEMU's ``sev-guest`` object reads them.

``dh-cert-file`` (the owner's DH ``sev_cert``) and ``session-file`` (the 128-byte launch
session) are base64 text files (``sev_read_file_base64``: ``g_file_get_contents`` then
glib's lenient ``g_base64_decode``). QEMU reads them only when the option is given, and
passes the session even without a certificate (the firmware then ignores it).
"""

from __future__ import annotations

import os

from .vm import SevError


def read_file_base64(path: str) -> bytes:
    """The decoded contents, or SevError with QEMU's text: failed to read 'F' (why)."""
    from sevmon.commands.sev import g_base64_decode
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        verb = "read" if isinstance(e, IsADirectoryError) else "open"
        raise SevError(f"failed to read '{path}' (Failed to {verb} file \u201c{path}\u201d: "
                       f"{os.strerror(e.errno) if e.errno else e})") from None
    return g_base64_decode(text.decode("latin-1"))


def owner_launch_files(args) -> dict:
    """``SevVm`` keyword arguments for ``--dh-cert-file``/``--session-file`` (empty if none)."""
    out = {}
    if getattr(args, "session_file", None):
        out["session"] = read_file_base64(args.session_file)
    if getattr(args, "dh_cert_file", None):
        out["dh_cert"] = read_file_base64(args.dh_cert_file)
    return out
