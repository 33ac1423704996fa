"""``sevmon serve --attach``: sevmon as the front end of a running QEMU.

QEMU keeps running the guest; sevmon holds one of QEMU's QMP monitors for its lifetime
(``link``), maps the guest's shared RAM backend (``ram``, laid out by ``layout``), reads
vCPU registers from QEMU (``registers``), answers the memory commands itself
(``commands``) and forwards everything else unchanged (``forward``). ``machine`` offers
the same surface as the local model, so the memory commands run on it unchanged.
"""
