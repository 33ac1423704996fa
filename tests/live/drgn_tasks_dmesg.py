"""A drgn script (run as ``drgn SCRIPT OUT`` runs it, ``prog`` in its globals): the guest kernel's release, its
task list (pid, comm) and its printk records (timestamp, text), as JSON into ``sys.argv[1]``. When ``prog`` is
sevmon's (``sevmon drgn``), what its reader asked of the daemon too."""

import json
import sys

from drgn.helpers.linux.pid import for_each_task
from drgn.helpers.linux.printk import get_printk_records

out = {
    "argv": sys.argv,
    "release": prog["UTS_RELEASE"].string_().decode(),  # noqa: F821 (drgn's global)
    "tasks": [[int(t.pid), t.comm.string_().decode()] for t in for_each_task(prog)],  # noqa: F821
    "dmesg": [[r.timestamp, r.text.decode(errors="replace")] for r in get_printk_records(prog)],  # noqa: F821
}
reader = prog.config.get("sevmon_reader")  # noqa: F821
if reader is not None:
    out["reader"] = {"reads": reader.reads, "requests": reader.requests, "pages": len(reader.pages)}
with open(sys.argv[1], "w") as f:
    json.dump(out, f)
