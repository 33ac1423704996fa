"""One error type for attaching: its text is the one sentence the user sees."""

from __future__ import annotations


class AttachError(Exception):
    """sevmon cannot attach (or lost QEMU): ``str()`` is one sentence, nothing half-started."""
