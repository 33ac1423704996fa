"""QMP errors: QEMU's five error classes and nothing else (qapi/error.json QapiErrorClass)."""

from __future__ import annotations

GENERIC = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"
DEVICE_NOT_FOUND = "DeviceNotFound"
KVM_MISSING_CAP = "KVMMissingCap"

ERROR_CLASSES = (GENERIC, COMMAND_NOT_FOUND, DEVICE_NOT_ACTIVE, DEVICE_NOT_FOUND, KVM_MISSING_CAP)


class QMPError(Exception):
    """An error reply: ``{"error": {"class": cls, "desc": desc}}``. Handlers raise it."""

    def __init__(self, desc: str, cls: str = GENERIC):
        assert cls in ERROR_CLASSES, cls
        super().__init__(desc)
        self.desc = desc
        self.cls = cls

    def to_wire(self) -> dict:
        return {"class": self.cls, "desc": self.desc}
