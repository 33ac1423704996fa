"""QMP's form of sevmon's error type: ``{"error": {"class": cls, "desc": desc}}``, with QEMU's five error classes
and nothing else (qapi/error.json QapiErrorClass)."""

from __future__ import annotations

from sevmon.errors import (  # noqa: F401  (re-exported: QMP's vocabulary)
    COMMAND_NOT_FOUND,
    DEVICE_NOT_ACTIVE,
    DEVICE_NOT_FOUND,
    ERROR_CLASSES,
    GENERIC,
    KVM_MISSING_CAP,
    CommandError,
)


def to_wire(error: CommandError) -> dict:
    """The ``error`` member of a QMP reply."""
    return {"class": error.cls, "desc": error.desc}
