"""sevmon: a QEMU 7.2-compatible monitor daemon for AMD SEV guests.

Layers (one package each, top to bottom; see README "Architecture"):

- ``qmp``     byte stream -> JSON -> session -> schema-checked dispatch
- ``hmp``     the human monitor: command table, argument parser, QEMU's text formats
- ``machine`` the VM the monitor talks to: run state, events, vCPU registers, RAM
- ``x86``     page-table walkers (32-bit, PAE, 4-level, 5-level), C-bit stripped
- ``debug``   guest memory access with the *debug* attribute, through a page cache
- ``sev``     the SEV platform: ABI, memory encryption engine, firmware, kernel transport
"""

__version__ = "0.1.0"

# What the greeting and query-version report as the emulated QEMU release, so that
# clients which gate features on the QEMU version treat sevmon as QEMU 7.2.
QEMU_VERSION = (7, 2, 22)

# The ``package`` string of query-version (QEMU puts its distributor's build string there).
PACKAGE = f"sevmon {__version__}"
