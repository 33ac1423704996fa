"""drgn on a live guest that sevmon serves: every byte drgn reads goes through sevmon's QMP ``read-guest-physical``
(the debug-refusal rule, DBG_DECRYPT, the daemon's page cache), the kernel's VMCOREINFO comes from
``query-guest-kernel``.

- :func:`program` (``sevmon.drgn.program(socket, vmlinux=...)``): a ``drgn.Program`` (module ``target``);
- ``reader``: the physical reader drgn calls, with a client-side page cache and when it is dropped;
- ``qmp_client``: the small blocking QMP client under it;
- ``run``: ``sevmon drgn SOCKET [-s VMLINUX] [SCRIPT [ARGS...]]``.

drgn is optional (``pip install 'sevmon[drgn]'``); nothing here imports it until a Program is made.
"""

from __future__ import annotations

from sevmon.drgn.target import DrgnSetupError, program

__all__ = ["DrgnSetupError", "program"]
