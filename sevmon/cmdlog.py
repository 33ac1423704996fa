"""``sevmon -v``: one log line per command the daemon runs, with its duration.

Only the command's name is logged (for HMP, the command word and an ``info`` subcommand):
arguments can hold file names and launch secrets, which do not belong in a log.
"""

from __future__ import annotations

import contextlib
import logging
import time

log = logging.getLogger("sevmon.commands")


def hmp_label(line: str) -> str:
    words = line.split()
    if not words:
        return "(empty line)"
    return " ".join(words[:2]) if words[0] == "info" and len(words) > 1 else words[0]


def qmp_label(name: str, args: dict) -> str:
    if name == "human-monitor-command" and isinstance(args.get("command-line"), str):
        return f"QMP {name}: {hmp_label(args['command-line'])}"
    return f"QMP {name}"


@contextlib.contextmanager
def timed(label: str):
    """Log ``label: N ms`` (or ``failed after``) at debug level, i.e. under ``-v``."""
    if not log.isEnabledFor(logging.DEBUG):
        yield
        return
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        log.debug("%s: failed after %.1f ms", label, (time.perf_counter() - start) * 1e3)
        raise
    log.debug("%s: %.1f ms", label, (time.perf_counter() - start) * 1e3)
