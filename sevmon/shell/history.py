"""The shell's history file, kept private: typed commands can hold secrets (file names,
launch secrets), so it is created, or an existing one made, readable by its owner only."""

from __future__ import annotations

import os


def open_private(path) -> None:
    """Create ``path`` (and its directory) with mode 0600, or chmod an existing file to it."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
