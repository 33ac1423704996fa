"""Build the machine the daemon serves from a :class:`~sevmon.machine.spec.GuestSpec`.

Sources: the built-in guest (default), a QEMU ELF core or a raw RAM image. With SEV (the default for the built-in
guest) the guest runs on the SEV platform model: its image goes through LAUNCH_UPDATE_DATA and its RAM is
ciphertext from then on; the monitor reaches it only through DBG_DECRYPT.
"""

from __future__ import annotations

import logging

from sevmon.debug.access import DebugMemory
from sevmon.debug.ops import PlainOps, SevOps
from sevmon.machine.cpu_models import CpuModelError, cpuid_signature
from sevmon.machine.images import ImageError, apply_cpu_json, kernel_root_cpu, load_core, load_raw
from sevmon.machine.interface import MachineConfig
from sevmon.machine.launch import EsLaunchError, PlatformFileError, es_vmsas, launch_sev
from sevmon.machine.local import LocalMachine
from sevmon.machine.pflash import FlashError
from sevmon.machine.required_registers import paging_registers_error
from sevmon.machine.sevify import set_cbit
from sevmon.machine.spec import GuestSpec
from sevmon.memory.ram import PAGE_SHIFT
from sevmon.sev.linux import SevUnavailable
from sevmon.sev.vm import SevError
from sevmon.x86.cpu import CpuState

log = logging.getLogger("sevmon")


class GuestError(Exception):
    """The guest cannot be built: one clear sentence for the user."""


def build_machine(spec: GuestSpec) -> LocalMachine:
    """The machine ``spec`` describes; GuestError (one sentence) when it cannot be built."""
    try:
        return _build(spec)
    except (ImageError, FlashError, PlatformFileError, CpuModelError, EsLaunchError) as e:
        raise GuestError(str(e)) from None
    except OSError as e:  # --bios/--pflash and friends
        raise GuestError(f"{e.filename}: {e.strerror.lower() if e.strerror else e}") from None
    except (SevError, SevUnavailable) as e:
        raise GuestError(str(e)) from None


def _debug_memory(spec: GuestSpec):
    """How the machine's debug-access layer is made once its RAM and SEV context exist."""
    cache_pages = max(0, spec.debug_cache_mb) << (20 - PAGE_SHIFT)

    def make(ram, sev) -> DebugMemory:
        ops = (SevOps(ram, sev, allowed=spec.debug_policy) if sev is not None
               else PlainOps(ram, allowed=spec.debug_policy))
        return DebugMemory(ram, ops, cache_pages=cache_pages)
    return make


def _build(spec: GuestSpec) -> LocalMachine:
    cpuid_signature(spec.cpu_model)  # QEMU refuses an unknown -cpu before anything else
    if spec.source == "builtin" and spec.sev is not None and spec.sev.kvm:
        raise GuestError("--kvm needs a guest image (--core or --raw): the built-in guest runs only on the SEV "
                         "platform model, it has no vCPU on real KVM")
    if spec.incoming:
        if spec.sev is None or spec.source != "builtin":
            raise GuestError("--incoming receives an SEV guest (SEND/RECEIVE): it takes neither --no-sev, "
                             "--core nor --raw")
        kind, _, rest = spec.incoming.partition(":")
        if kind not in ("unix", "exec") or not rest:
            raise GuestError(f"--incoming {spec.incoming}: sevmon receives over unix:PATH or exec:COMMAND only")
        from sevmon.machine.incoming import build_incoming
        return build_incoming(spec, _debug_memory(spec))
    if spec.source == "builtin":
        from sevmon.machine.builtin_guest import build_builtin
        return build_builtin(spec, _debug_memory(spec))
    image = load_core(spec.image) if spec.source == "core" else load_raw(spec.image)
    if spec.cpu_state:
        apply_cpu_json(image, spec.cpu_state)
    elif spec.source == "raw":
        image.cpus[0].unavailable = "the raw image carries no vCPU state (no --cpu-state)"
    elif not image.cpu_notes:  # walked from the kernel's own tables, as a raw image is, never from zeros
        image.cpus[0].unavailable = "the core carries no vCPU state (no register notes, as in an SEV-ES guest's dump)"
    if spec.source == "raw" and spec.cpu_state:
        problem = paging_registers_error(spec.cpu_state, image.cpus[0])
        if problem:
            raise GuestError(problem)
    ram, cpus = image.ram, image.cpus
    sev = None
    if spec.sev is not None:
        tables = _tables_cpu(ram, cpus[0])
        if tables is not None:
            set_cbit(ram, tables, spec.sev.cbitpos)
        runs = [(first << PAGE_SHIFT, ram.read(first << PAGE_SHIFT, n << PAGE_SHIFT)) for first, n in ram.runs()]
        vmsas = es_vmsas(spec.sev, len(cpus), spec.cpu_model, None)
        sev = launch_sev(ram, runs, spec.sev, vmsas)
        if sev.es:  # launched as SEV-ES: the image's registers are now sealed in VMSAs, and shown nowhere
            cpus = [CpuState.encrypted(i) for i in range(len(cpus))]
    config = MachineConfig(kvm_enabled=sev is not None, memory_encryption=sev is not None, source=spec.source, debug_policy=spec.debug_policy)
    return LocalMachine(ram, cpus, _debug_memory(spec)(ram, sev), config=config, sev=sev,
                        prelaunch=spec.prelaunch, running=False)


def _tables_cpu(ram, cpu):
    """The vCPU whose tables get the C-bit: the image's own, or, without registers, one at the Linux kernel's
    root (found in the plaintext image as it will be found through DBG_DECRYPT after launch), so that the kernel's
    tables carry the C-bit as a Linux SEV guest's do. No Linux found: None, no table is touched."""
    return cpu if cpu.unavailable is None else kernel_root_cpu(ram)
