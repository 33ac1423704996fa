"""Command-line validation: every bad option value is one line naming the option and the
accepted range, exit status 2 (argparse's convention), never a traceback from deep inside.

Ranges are checked by the option types at parse time; what depends on two options (the
C-bit position against the guest-physical address width of the guest's RAM, the RAM size
against the paging mode) by :func:`check_guest_options` right after parsing.
"""

from __future__ import annotations

import argparse
import os

from sevmon.machine.builtin_guest import MIN_MEMORY_MIB

MEMORY_MIN_MIB = MIN_MEMORY_MIB
#: The built-in guest draws its frames from a list of all of RAM: keep it to what builds in seconds.
MEMORY_MAX_MIB = 16 << 10
#: 32-bit paging holds 32-bit frame addresses: the guest's RAM must lie below 4 GiB.
MEMORY_MAX_MIB_32 = 4 << 10
#: Page-table entries carry physical-address bits 12..51; the C-bit must be one of them.
CBITPOS_MAX = 51
POLICY_MAX = 0xFFFFFFFF


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (``prog: error: ...``), status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _fmt(v: int, hexa: bool) -> str:
    return f"{v:#x}" if hexa else str(v)


def ranged(lo: int, hi: int | None = None, *, hexa: bool = False, what: str = ""):
    """An option type: an integer in C notation (``0x1f``, ``017``, ``31``) within ``lo..hi``."""
    accepted = f"{_fmt(lo, hexa)}..{_fmt(hi, hexa)}" if hi is not None else f"{_fmt(lo, hexa)} or more"
    accepted += f" {what}" if what else ""

    def parse(text: str) -> int:
        try:
            value = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer value: {text!r} (accepted: {accepted})") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{text} is out of range (accepted: {accepted})")
        return value

    parse.__name__ = "integer"
    return parse


def guest_ram_end(args) -> int | None:
    """One past the highest guest-physical address of the guest's RAM, if known before building it.

    Built-in guest: ``--memory``; ``--raw``: the file's size; ``--core``: the highest PT_LOAD end.
    None when the file cannot be read (building the guest then reports that in its own words).
    """
    try:
        if args.raw:
            return os.path.getsize(args.raw)
        if args.core:
            from elftools.elf.elffile import ELFFile

            from sevmon.machine.images import ram_loads
            with open(args.core, "rb") as f:
                elf = ELFFile(f)
                loads = ram_loads([s.header for s in elf.iter_segments() if s.header["p_type"] == "PT_LOAD"])
                return max((h["p_paddr"] + h["p_memsz"] for h in loads), default=None)
    except Exception:
        return None
    return args.memory << 20


def check_guest_options(parser: argparse.ArgumentParser, args) -> None:
    """The checks that need several options at once; ``parser.error`` (one line, exit 2) on failure."""
    builtin = not (args.core or args.raw)
    if builtin and getattr(args, "cpu_state", None):
        parser.error("argument --cpu-state: only with --core or --raw (the built-in guest sets its own registers)")
    if builtin and args.paging == "32" and args.memory > MEMORY_MAX_MIB_32:
        parser.error(f"argument --memory: {args.memory} is out of range for --paging 32 "
                     f"(accepted: {MEMORY_MIN_MIB}..{MEMORY_MAX_MIB_32} MiB: 32-bit page tables reach 4 GiB)")
    sev = args.sev is not False if builtin else bool(args.sev)
    if not sev:
        return
    end = guest_ram_end(args)
    if end is None or end <= 0:
        return
    width = max(end - 1, 1).bit_length()
    if not width <= args.cbitpos <= CBITPOS_MAX:
        size = f"{args.memory} MiB" if builtin else f"{end:#x} bytes"
        parser.error(f"argument --cbitpos: {args.cbitpos} is out of range for {size} of guest RAM "
                     f"(accepted: {width}..{CBITPOS_MAX}: the C-bit must lie above the {width}-bit "
                     f"guest-physical addresses the RAM needs, within the page tables' address bits)")


def add_verbose(p: argparse.ArgumentParser, *, top: bool = False,
                help: str = "log each command the daemon runs, with its duration (and other debug lines) to stderr",
                ) -> None:
    """``-v`` on the top level and on each subcommand (``sevmon serve -v`` reads naturally); ``help`` says what
    it shows for that subcommand."""
    p.add_argument("-v", "--verbose", action="store_true", default=False if top else argparse.SUPPRESS, help=help)

