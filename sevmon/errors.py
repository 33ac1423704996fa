"""sevmon's one error type for a failed monitor command, independent of the wire that reports it.

Commands raise :class:`CommandError` with QEMU's sentence; each front end maps it to its own wire form: QMP
replies ``{"error": {"class": cls, "desc": desc}}`` (:func:`sevmon.qmp.errors.to_wire`), HMP prints
``Error: desc`` after what the command printed (QEMU's ``hmp_handle_error``), and the gdb stub sends ``desc`` as
console output before its error reply.
"""

from __future__ import annotations

# QEMU's error classes (qapi/error.json QapiErrorClass): what QMP's "class" may say, and nothing else
GENERIC = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"
DEVICE_NOT_FOUND = "DeviceNotFound"
KVM_MISSING_CAP = "KVMMissingCap"

ERROR_CLASSES = (GENERIC, COMMAND_NOT_FOUND, DEVICE_NOT_ACTIVE, DEVICE_NOT_FOUND, KVM_MISSING_CAP)


class CommandError(Exception):
    """A monitor command failed: ``desc`` is the one sentence the user sees, ``cls`` QEMU's error class for it."""

    def __init__(self, desc: str, cls: str = GENERIC):
        assert cls in ERROR_CLASSES, cls
        super().__init__(desc)
        self.desc = desc
        self.cls = cls
