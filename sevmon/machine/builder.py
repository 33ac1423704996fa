"""Build the Machine the daemon serves from the guest options.

Sources: the built-in guest (default), a QEMU ELF core (``--core``) or a raw RAM image
(``--raw`` + ``--cpu-state``). With ``--sev`` (the default for the built-in guest) the
guest runs on the SEV platform model: its image goes through LAUNCH_UPDATE_DATA and its
RAM is ciphertext from then on; the monitor reaches it only through DBG_DECRYPT.
"""

from __future__ import annotations

import logging

from sevmon.debug.access import DebugMemory
from sevmon.debug.ops import PlainOps, SevOps
from sevmon.machine.images import ImageError, apply_cpu_json, load_core, load_raw
from sevmon.machine.pflash import FlashError
from sevmon.machine.ram import PAGE_SHIFT
from sevmon.machine.sevify import set_cbit
from sevmon.machine.vm import Machine, MachineConfig

log = logging.getLogger("sevmon")


class GuestError(Exception):
    """The guest cannot be built: one clear sentence for the user."""


def build_machine(args) -> Machine:
    try:
        return _build(args)
    except ImageError as e:
        raise GuestError(str(e)) from None
    except FlashError as e:
        raise GuestError(str(e)) from None
    except OSError as e:  # --bios/--pflash and friends
        raise GuestError(f"{e.filename}: {e.strerror.lower() if e.strerror else e}") from None
    except Exception as e:
        from sevmon.sev.linux import SevUnavailable
        from sevmon.sev.vm import SevError
        if isinstance(e, SevError | SevUnavailable):
            raise GuestError(str(e)) from None
        raise


def _sev_kernel(args):
    """The kernel transport: the simulated platform, or real /dev/kvm + /dev/sev."""
    if not args.kvm:
        if not getattr(args, "sev_platform", None):
            return None  # SevVm makes a fresh simulated platform
        from sevmon.sev.platform_store import load_or_create
        from sevmon.sev.transport import SimulatedHost, SimulatedKvm
        host = SimulatedHost(cbitpos=args.cbitpos, reduced_phys_bits=max(args.reduced_phys_bits, 0))
        try:
            load_or_create(args.sev_platform, host.psp)
        except (ValueError, KeyError, TypeError) as e:
            raise GuestError(f"--sev-platform {args.sev_platform}: not a sevmon platform file ({e})") from None
        return SimulatedKvm(host)
    from sevmon.sev.linux import LinuxSevTransport
    return LinuxSevTransport()  # raises SevUnavailable with one sentence on hosts without SEV


def _build(args) -> Machine:
    debug_allowed = args.debug_policy == "on"
    cache_pages = max(0, args.debug_cache_mb) << (20 - PAGE_SHIFT)
    if getattr(args, "incoming", None):
        if args.sev is False or args.core or args.raw:
            raise GuestError("--incoming receives an SEV guest (SEND/RECEIVE): it takes neither --no-sev, "
                             "--core nor --raw")
        kind, _, rest = args.incoming.partition(":")
        if kind not in ("unix", "exec") or not rest:
            raise GuestError(f"--incoming {args.incoming}: sevmon receives over unix:PATH or exec:COMMAND only")
        from sevmon.machine.incoming import build_incoming
        machine = build_incoming(args)
    elif args.core or args.raw:
        if args.raw and not args.cpu_state:
            raise GuestError("--raw needs --cpu-state FILE.json: a raw image carries no registers")
        image = load_core(args.core) if args.core else load_raw(args.raw)
        if args.cpu_state:
            apply_cpu_json(image, args.cpu_state)
        ram, cpus = image.ram, image.cpus
        sev = None
        if args.sev:
            from sevmon.sev.vm import SevVm
            set_cbit(ram, cpus[0], args.cbitpos)
            from sevmon.sev.owner_files import owner_launch_files
            sev = SevVm(ram, policy=args.policy, cbitpos=args.cbitpos,
                        reduced_phys_bits=args.reduced_phys_bits, kernel=_sev_kernel(args),
                        **owner_launch_files(args))
            runs = [(first << PAGE_SHIFT, ram.read(first << PAGE_SHIFT, n << PAGE_SHIFT)) for first, n in ram.runs()]
            sev.launch(runs)
            if not args.prelaunch:
                sev.finish()
        config = MachineConfig(kvm_enabled=sev is not None, source="core" if args.core else "raw",
                               debug_policy=debug_allowed)
        machine = Machine(ram, cpus, config=config, sev=sev, running=False, prelaunch=args.prelaunch)
        if args.prelaunch and sev is not None:
            machine.first_run = sev.finish
    else:
        from sevmon.machine.builtin_guest import build_builtin
        machine = build_builtin(args)
    ops = (SevOps(machine.ram, machine.sev, allowed=debug_allowed) if machine.sev is not None
           else PlainOps(machine.ram, allowed=debug_allowed))
    machine.memory = DebugMemory(machine.ram, ops, cache_pages=cache_pages)
    return machine
