"""The line the shell greets a person with, as QEMU's HMP does on an interactive monitor
(``QEMU 7.2.22 monitor - type 'help' for more information``), naming the server that
answered the QMP greeting: sevmon (its ``package``) or QEMU itself."""

from __future__ import annotations


def banner(greeting) -> str:
    """The banner for a ``qemu.qmp`` Greeting (or None if none was received)."""
    name = "QEMU"
    try:
        version = greeting.QMP.version  # the greeting's raw {"qemu": {...}, "package": ...}
        package = str(version.get("package") or "").strip()
        q = version["qemu"]
        name = package if package.startswith("sevmon") else f"QEMU {q['major']}.{q['minor']}.{q['micro']}"
    except (AttributeError, KeyError, TypeError):
        pass
    return f"{name} monitor - type 'help' for more information"

