"""``sevmon drgn SOCKET [-s VMLINUX] [SCRIPT [ARGS...]]``: drgn on the live guest sevmon serves.

It behaves as the ``drgn`` command does on a kernel: no script and a terminal on stdin, drgn's interactive console
(its banner, helpers and ``prog``); a script, run as ``drgn SCRIPT ARGS`` runs it (``prog`` in its globals,
``sys.argv`` = ``[SCRIPT, ARGS...]``, the script's folder on ``sys.path``, drgn's default program set); no script
and stdin not a terminal, stdin run as a script. Anything that stops the Program from being made (no drgn, no such
socket, debugging refused, no Linux kernel found, a vmlinux that is not the guest's) is one sentence on stderr and
exit status 1, before any guest data is printed.
"""

from __future__ import annotations

import os
import pkgutil
import runpy
import sys

from sevmon.drgn.target import DrgnSetupError, import_drgn, program


def _fail(message: str) -> int:
    print(f"sevmon drgn: {message}", file=sys.stderr)
    return 1


def make_program(socket: str, vmlinux: str | None):
    """The Program, or DrgnSetupError with drgn's own complaint about the vmlinux in one sentence."""
    import_drgn()
    try:
        return program(socket, vmlinux)
    except (OSError, ValueError) as e:
        raise DrgnSetupError(f"{vmlinux}: {e}") from None


def main(socket: str, vmlinux: str | None, script: str | None, args: list[str]) -> int:
    try:
        prog = make_program(socket, vmlinux)
    except DrgnSetupError as e:
        return _fail(str(e))
    import drgn
    import drgn.cli
    if script is None and sys.stdin.isatty():
        print(drgn.cli.version_header(), file=sys.stderr, flush=True)
        drgn.cli.run_interactive(prog, banner_func=lambda banner: (
            f"sevmon: the live guest on {socket}, every byte read through sevmon's debug path\n{banner}"))
        return 0
    drgn.set_default_prog(prog)
    if script is not None:
        sys.argv = [script, *args]
        if pkgutil.get_importer(script) is None:
            sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        runpy.run_path(script, init_globals={"prog": prog}, run_name="__main__")
        return 0
    sys.path.insert(0, "")
    sys.argv = [""]
    exec_globals = drgn.cli.default_globals(prog)
    exec_globals["__file__"] = "<stdin>"
    exec(compile(sys.stdin.read(), "<stdin>", "exec"), exec_globals)
    return 0
