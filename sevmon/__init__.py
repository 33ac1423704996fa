"""sevmon: a QEMU 7.2-compatible monitor daemon for AMD SEV guests.

Floors, one package each: ARCHITECTURE.md draws them and ``tests/test_layers.py`` holds their ranks. From the
top: ``cli``; ``attach`` (a running QEMU); ``daemon``; ``gdb``; ``commands``; ``machine`` (the VM the monitor
talks to); ``x86`` (paging, translation) and ``hmp`` (the human monitor library); ``debug`` (guest memory with
the *debug* attribute, through a page cache) and ``model`` (the SEV platform model); ``sev`` (the real SEV path:
the VMM over a kernel transport); ``memory`` (guest RAM at rest) and ``qmp`` (the QMP library).
"""

__version__ = "0.1.0"

# What the greeting and query-version report as the emulated QEMU release, so that
# clients which gate features on the QEMU version treat sevmon as QEMU 7.2.
QEMU_VERSION = (7, 2, 22)

# The ``package`` string of query-version (QEMU puts its distributor's build string there).
PACKAGE = f"sevmon {__version__}"
