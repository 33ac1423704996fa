"""The ``sevmon`` command: ``serve`` (the daemon), ``shell`` (interactive HMP), ``bench``, ``check``."""

from __future__ import annotations

import argparse
import logging
import sys

from sevmon import __version__
from sevmon.machine.spec import GuestSpec, SevSpec
from sevmon.options import (
    CBITPOS_MAX,
    MEMORY_MAX_MIB,
    MEMORY_MIN_MIB,
    POLICY_MAX,
    OneLineParser,
    add_verbose,
    check_guest_options,
    ranged,
)
from sevmon.x86.modes import CLI_NAMES

DESCRIPTION = ("A QEMU-compatible monitor daemon (QMP and HMP) for AMD SEV guests: serve runs it, "
               "shell is an HMP prompt over its QMP socket, bench measures its kernel round trips.")


def add_guest_options(p: argparse.ArgumentParser) -> None:
    """Options that choose and configure the guest (shared by serve and bench)."""
    g = p.add_argument_group("guest")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--core", metavar="FILE", help="open a QEMU dump-guest-memory ELF core")
    src.add_argument("--raw", metavar="FILE", help="open a raw RAM image (pmemsave); registers from --cpu-state, "
                     "else the Linux kernel's own page tables are walked")
    g.add_argument("--cpu-state", metavar="FILE.json", help="vCPU registers as hex strings (cr0, cr3, cr4, efer, rip...)")
    sev = g.add_mutually_exclusive_group()
    sev.add_argument("--sev", dest="sev", action="store_true", default=None,
                     help="run the guest as an SEV guest on the platform model (default for the built-in guest)")
    sev.add_argument("--no-sev", dest="sev", action="store_false", help="plain, unencrypted memory")
    g.add_argument("--policy", type=ranged(0, POLICY_MAX, hexa=True), default=0x0,
                   help="SEV guest policy (default 0x0: debugging allowed; QEMU's default 0x1 forbids it)")
    g.add_argument("--cbitpos", type=ranged(0, CBITPOS_MAX), default=None,
                   help="C-bit position, CPUID 0x8000001F EBX[5:0] (default: the host's under --kvm, else 47); "
                        f"must lie above the guest-physical address width of the guest's RAM, at most {CBITPOS_MAX}")
    g.add_argument("--reduced-phys-bits", type=ranged(1, 63), default=1,
                   help="physical address bits lost to the C-bit, CPUID 0x8000001F EBX[11:6], 1..63 (default 1)")
    g.add_argument("--bios", metavar="FILE", help="firmware image measured at launch (default: a built-in one)")
    g.add_argument("--pflash", metavar="FILE", action="append", default=[],
                   help="QEMU's -drive if=pflash,unit=N (repeat for units 0, 1...): unit 0 replaces the BIOS, "
                        "ends at 4 GiB and alone is measured; later units (OVMF_VARS) sit below it, plain")
    g.add_argument("--dh-cert-file", metavar="FILE",
                   help="the guest owner's DH certificate (base64 sev_cert), as QEMU's sev-guest dh-cert-file")
    g.add_argument("--session-file", metavar="FILE",
                   help="the guest owner's launch session (base64, 128 bytes), as QEMU's sev-guest session-file")
    g.add_argument("--sev-platform", metavar="FILE",
                   help="simulated platform's persistent keys (OCA/PEK/PDH/CEK): created on first use, then "
                        "reused, so an owner can fetch the PDH and launch later on the same 'machine'")
    g.add_argument("--smp", metavar="N", type=ranged(1, 64), default=1,
                   help="QEMU's -smp: the number of vCPUs, 1..64 (default 1); an SEV-ES guest launches a VMSA for each")
    g.add_argument("--cpu", metavar="MODEL", default="qemu64",
                   help="QEMU's -cpu: the CPU model (qemu64, EPYC, EPYC-Rome, EPYC-Milan...), whose CPUID "
                        "signature an SEV-ES guest's VMSAs carry (default qemu64)")
    g.add_argument("--paging", choices=["4", "5", "pae", "32"], default="4", help="built-in guest paging mode")
    g.add_argument("--memory", metavar="MIB", type=ranged(MEMORY_MIN_MIB, MEMORY_MAX_MIB, what="MiB"), default=256,
                   help=f"built-in guest RAM size in MiB, {MEMORY_MIN_MIB}..{MEMORY_MAX_MIB} (default 256)")
    g.add_argument("--debug-policy", choices=["on", "off"], default="on",
                   help="security-policy object: 'off' forbids debug access even if the guest policy allows it")
    g.add_argument("--debug-cache-mb", type=ranged(0, 1 << 20, what="MiB"), default=64,
                   help="plaintext page cache size in MiB, 0 (no cache) or more (default 64)")
    g.add_argument("--kvm", action="store_true", help="use the real /dev/kvm + /dev/sev (SEV hardware only)")
    g.add_argument("-S", dest="prelaunch", action="store_true",
                   help="freeze the CPU at startup (QEMU's -S): the SEV guest stays in launch-secret, where "
                        "sev-inject-launch-secret works, until the first cont runs LAUNCH_FINISH")
    g.add_argument("--no-workload", dest="workload", action="store_false",
                   help="built-in guest: do not run the page-mapping workload while running")


def _cbitpos(args: argparse.Namespace) -> int:
    """--cbitpos, else under --kvm the host's own (CPUID 0x8000001F EBX[5:0]: 47 on Rome, 51 on Milan and Genoa),
    else 47 (the platform model's Rome-like default). A host without SEV reports 0: keep 47 and let the
    transport say why SEV is unavailable."""
    if args.cbitpos is not None:
        return args.cbitpos
    if args.kvm:
        from sevmon.sev.linux import SevUnavailable, host_cpuid
        try:
            cbit = host_cpuid().cbitpos
        except SevUnavailable:
            cbit = 0
        if cbit:
            return cbit
    return 47


def guest_spec(args: argparse.Namespace) -> GuestSpec:
    """The guest options as a :class:`GuestSpec` (the machine layer never sees argparse)."""
    source = "core" if args.core else "raw" if args.raw else "builtin"
    # SEV is the default for the built-in guest only; --sev/--no-sev decide for images.
    sev_on = args.sev is not False if source == "builtin" else bool(args.sev)
    sev = SevSpec(policy=args.policy, cbitpos=_cbitpos(args), reduced_phys_bits=args.reduced_phys_bits,
                  kvm=args.kvm, dh_cert_file=args.dh_cert_file, session_file=args.session_file,
                  platform_file=args.sev_platform) if sev_on else None
    return GuestSpec(source=source, image=args.core or args.raw, cpu_state=args.cpu_state, sev=sev,
                     bios=args.bios, pflash=tuple(args.pflash), paging=CLI_NAMES[args.paging],
                     memory_mib=args.memory, smp=args.smp, cpu_model=args.cpu, debug_policy=args.debug_policy == "on",
                     debug_cache_mb=args.debug_cache_mb, prelaunch=args.prelaunch, workload=args.workload,
                     incoming=getattr(args, "incoming", None))


def _check_attach_options(serve, args) -> None:
    """--qemu-pid belongs to --attach, --connect to --libvirt; --attach and --libvirt exclude each other."""
    if args.attach and args.libvirt:
        serve.error("argument --libvirt: not allowed with argument --attach")
    if args.libvirt and args.incoming:
        serve.error("argument --incoming: not allowed with argument --libvirt (the domain's QEMU takes its own "
                    "-incoming)")
    if args.qemu_pid is not None and not args.attach:
        serve.error("argument --qemu-pid: only with --attach (QEMU's process behind a proxy's socket)")
    if args.connect is not None and not args.libvirt:
        serve.error("argument --connect: only with --libvirt")


def build_parser() -> OneLineParser:
    """The whole command line; ``parser.subcommands`` maps each subcommand to its parser."""
    parser = OneLineParser(prog="sevmon", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"sevmon {__version__}")
    add_verbose(parser, top=True)
    sub = parser.add_subparsers(dest="subcommand", required=True)

    serve = sub.add_parser("serve", help="run the monitor daemon (QMP, and HMP with --hmp)")
    serve.add_argument("--qmp", metavar="PATH", action="append",
                       help="QMP UNIX socket (repeatable; default ./sevmon-qmp.sock)")
    serve.add_argument("--hmp", metavar="PATH", action="append", default=[], help="HMP UNIX socket (repeatable)")
    serve.add_argument("--incoming", metavar="URI",
                       help="QEMU's -incoming: start in 'inmigrate' and receive an SEV guest from unix:PATH "
                            "(listening there) or exec:COMMAND (its output)")
    serve.add_argument("--attach", metavar="QEMU_QMP_SOCKET",
                       help="be the monitor of a running QEMU: its QMP socket, its RAM in a shared backend "
                            "(see README)")
    serve.add_argument("--qemu-pid", type=ranged(1, 2**22), metavar="PID",
                       help="with --attach: QEMU's process, when the socket is a proxy's (its peer is not QEMU)")
    serve.add_argument("--libvirt", metavar="DOMAIN",
                       help="be the monitor of a running libvirt domain (name, id or UUID) through libvirt's "
                            "QMP proxy; its RAM in a shared memfd backing (see README)")
    serve.add_argument("--connect", metavar="URI", help="with --libvirt: libvirt's connection URI "
                                                        "(default: libvirt's own default)")
    serve.add_argument("--gdb", metavar="DEVICE",
                       help="gdb stub, QEMU's -gdb syntax: tcp:[HOST]:PORT (tcp::1234 binds 127.0.0.1) or unix:PATH")
    add_guest_options(serve)
    add_verbose(serve)

    shell = sub.add_parser("shell", help="interactive HMP shell over QMP",
                           description="An HMP prompt over a QMP socket, as QEMU's monitor console.")
    shell.add_argument("socket", nargs="?", default="./sevmon-qmp.sock", metavar="QMP_SOCKET",
                       help="the daemon's QMP socket (default ./sevmon-qmp.sock)")
    shell.add_argument("-c", "--command", action="append", default=[], metavar="LINE",
                       help="run LINE non-interactively (repeatable); exit 1 if a line fails: a QMP error, "
                            "or HMP's 'Error: ...', 'unknown command' or a bad argument")

    bench = sub.add_parser("bench", help="measure round trips and times, side by side")
    bench.add_argument("--json", action="store_true", help="print the report as one JSON object")
    bench.add_argument("--scale", type=ranged(10, 100_000_000), nargs="?", const=1_000_000, default=None,
                       metavar="N", help="also time a generated guest with N mapped pages, 10..100000000 "
                                         "(default 1000000)")
    bench.add_argument("--scale-only", action="store_true",
                       help="time only the generated guests of --scale (default 1000000 pages), nothing else")
    bench.add_argument("--vs-qemu", nargs=2, metavar=("KERNEL", "INITRD"),
                       help="also compare with QEMU 7.2's own info tlb/info mem on a TCG guest booting KERNEL")
    bench.add_argument("--qemu-cpu", default="max,la57=off", metavar="MODEL",
                       help="-cpu for --vs-qemu (\"max\" lets Linux use 5-level paging)")
    bench.add_argument("--attach", action="store_true",
                       help="with --vs-qemu: sevmon attached to the live QEMU (serve --attach) against QEMU's own "
                            "monitor, same paused guest (4 GiB of RAM)")
    bench.add_argument("--drgn", metavar="VMLINUX",
                       help="also time drgn's task list and dmesg through sevmon against a naive reader (one "
                            "DBG_DECRYPT per drgn read); needs drgn, the kernel's debug vmlinux and a Linux guest: "
                            "--core/--raw, or --vs-qemu KERNEL INITRD booted and dumped by QEMU")
    bench.add_argument("--repeat", type=ranged(1, 1000), default=5,
                       help="wall times are medians of this many runs, 1..1000 (default 5)")
    add_guest_options(bench)

    drgn = sub.add_parser("drgn", help="drgn on the live guest, every byte through sevmon's debug path",
                          description="drgn on the Linux guest a sevmon daemon serves: its interactive console "
                                      "with prog ready, or SCRIPT run as 'drgn SCRIPT ARGS' runs it. Needs drgn "
                                      "(pip install 'sevmon[drgn]') and, for symbols, the guest kernel's debug "
                                      "vmlinux.")
    drgn.add_argument("socket", metavar="QMP_SOCKET", help="the daemon's QMP socket")
    drgn.add_argument("-s", "--symbols", metavar="VMLINUX",
                      help="the guest kernel's debug vmlinux (Debian: linux-image-RELEASE-dbg); without it, "
                           "no symbols: memory by address only (prog.read)")
    # SCRIPT and its ARGS as drgn takes them: everything after SCRIPT is the script's, options too
    drgn.add_argument("script", nargs=argparse.REMAINDER, metavar="SCRIPT [ARGS...]",
                      help="a drgn script (prog in its globals) and its arguments (sys.argv[1:])")

    check = sub.add_parser("check", help="can this host debug a live SEV guest? (exit 0 only when it can)")
    check.add_argument("--qemu-pid", type=int, metavar="PID", help="also check this running QEMU")
    check.add_argument("--qemu-qmp", metavar="SOCKET", help="QEMU's QMP socket, to read its guest policy")
    check.add_argument("--json", action="store_true", help="print the checks as one JSON object")

    add_verbose(shell, help="log the QMP traffic and the client library's debug lines to stderr")
    add_verbose(bench)
    add_verbose(check)
    parser.subcommands = sub.choices
    return parser


def _drgn_symbols(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``-s VMLINUX`` after the socket: argparse's remainder took it with the script, so take it back (only before
    SCRIPT: what follows SCRIPT is the script's own)."""
    rest = args.script
    while rest and rest[0].startswith("-"):
        opt = rest.pop(0)
        if opt in ("-s", "--symbols"):
            if not rest:
                p.error("argument -s/--symbols: expected one argument")
            args.symbols = rest.pop(0)
        elif opt.startswith("--symbols="):
            args.symbols = opt.partition("=")[2]
        elif opt.startswith("-s"):
            args.symbols = opt[2:]
        else:
            p.error(f"unrecognized arguments: {opt}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.subcommand in ("serve", "bench") and args.cbitpos is None:
        args.cbitpos = _cbitpos(args)
    if args.subcommand in ("serve", "bench"):
        check_guest_options(parser.subcommands[args.subcommand], args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="sevmon: %(message)s", stream=sys.stderr)
    logging.getLogger("asyncio").setLevel(logging.INFO)  # -v: not asyncio's "Using selector: EpollSelector"
    if args.subcommand == "serve" and args.gdb is not None:
        from sevmon.gdb.server import DeviceError, parse_device
        try:
            if args.gdb != "none":
                parse_device(args.gdb)
        except DeviceError as e:  # a bad option value, as for every other option: one line, exit 2
            parser.subcommands["serve"].error(f"argument --gdb: {e}")
    if args.subcommand == "serve" and args.attach and args.incoming:
        parser.subcommands["serve"].error("argument --incoming: not allowed with argument --attach "
                                          "(the attached QEMU takes its own -incoming)")
    if args.subcommand == "serve":
        _check_attach_options(parser.subcommands["serve"], args)
    if args.subcommand == "serve" and args.libvirt:
        from sevmon.attach.serve import serve_libvirt
        return serve_libvirt(args.libvirt, args.connect, guest_spec(args), args.qmp or ["./sevmon-qmp.sock"],
                             args.hmp, args.gdb)
    if args.subcommand == "serve" and args.attach:
        from sevmon.attach.serve import serve_attached
        return serve_attached(args.attach, guest_spec(args), args.qmp or ["./sevmon-qmp.sock"], args.hmp, args.gdb,
                              qemu_pid=args.qemu_pid)
    if args.subcommand == "serve":
        from sevmon.daemon import serve
        return serve(guest_spec(args), args.qmp or ["./sevmon-qmp.sock"], args.hmp, args.gdb)
    if args.subcommand == "check":
        from sevmon.check import main as check_main
        return check_main(args.qemu_pid, args.qemu_qmp, args.json)
    if args.subcommand == "drgn":
        _drgn_symbols(parser.subcommands["drgn"], args)
        from sevmon.drgn.run import main as drgn_main
        return drgn_main(args.socket, args.symbols, args.script[0] if args.script else None, args.script[1:])
    if args.subcommand == "shell":
        from sevmon.shell.app import run_shell
        return run_shell(args)
    from sevmon.bench.run import run_bench
    if args.drgn and not (args.core or args.raw or args.vs_qemu):
        parser.subcommands["bench"].error("argument --drgn: needs a Linux guest: a capture (--core FILE or --raw "
                                          "FILE), or --vs-qemu KERNEL INITRD to boot and dump one")
    if args.sev is None:
        args.sev = True  # the benchmark is about SEV: cores and raw images run encrypted
    args.workload = False
    return run_bench(args, guest_spec(args))
