"""``python -m sevmon.shell [QMP_SOCKET] [-c LINE]...``: the shell without the rest of the CLI."""

from __future__ import annotations

import argparse
import sys

from sevmon.shell.app import run_shell


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sevmon shell", description="interactive HMP shell over QMP")
    p.add_argument("socket", nargs="?", default="./sevmon-qmp.sock", metavar="QMP_SOCKET")
    p.add_argument("-c", "--command", action="append", default=[], metavar="LINE",
                   help="run LINE non-interactively (repeatable); exit non-zero on a QMP error")
    p.add_argument("-v", "--verbose", action="store_true")
    return run_shell(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
