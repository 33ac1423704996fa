"""Run state: query-status, stop, cont, system_reset, system_powerdown, query-kvm, vCPUs."""

from __future__ import annotations

import threading

from sevmon.commands import dump
from sevmon.errors import CommandError


def query_status(machine) -> dict:
    return {"status": machine.state.value, "singlestep": False, "running": machine.running}


def cont(runner) -> None:
    if runner.machine.reset_required:
        raise CommandError("Resetting the Virtual Machine is required")
    if runner.busy(dump.JOB):
        raise CommandError("There is a dump in process, please wait.")
    runner.machine.cont()


def kvm_info(machine) -> dict:
    return {"enabled": machine.config.kvm_enabled, "present": machine.config.kvm_present}


def register(registry, hmp, info) -> None:
    registry.register("query-status", inline=True)(lambda ctx: query_status(ctx.machine))
    @registry.register("stop")
    def qmp_stop(ctx):
        ctx.machine.stop()
        return {}

    registry.register("cont")(lambda ctx: cont(ctx.runner) or {})
    registry.register("system_reset")(lambda ctx: ctx.machine.system_reset() or {})
    registry.register("system_powerdown")(lambda ctx: ctx.machine.system_powerdown() or {})
    registry.register("query-kvm", inline=True)(lambda ctx: kvm_info(ctx.machine))

    @registry.register("query-cpus-fast", inline=True)
    def query_cpus_fast(ctx):
        tid = threading.get_native_id()
        return [{"thread-id": tid, "props": {"core-id": 0, "thread-id": 0, "socket-id": cpu.index},
                 "qom-path": f"/machine/unattached/device[{cpu.index}]", "cpu-index": cpu.index,
                 "target": ctx.machine.config.target} for cpu in ctx.machine.cpus]

    @hmp.command("stop|s", "", "", "stop emulation")
    def hmp_stop(ctx):
        ctx.machine.stop()

    @hmp.command("cont|c", "", "", "resume emulation")
    def hmp_cont(ctx):
        cont(ctx.runner)

    @hmp.command("system_reset", "", "", "reset the system")
    def hmp_system_reset(ctx):
        ctx.machine.system_reset()

    @hmp.command("system_powerdown", "", "", "send system power down event")
    def hmp_system_powerdown(ctx):
        ctx.machine.system_powerdown()

    @info.command("status", "", "", "show the current VM status (running|paused)")
    def info_status(ctx):
        st = query_status(ctx.machine)
        line = "VM status: " + ("running" if st["running"] else "paused")
        if not st["running"] and st["status"] != "paused":
            line += f" ({st['status']})"
        ctx.print(line)

    @info.command("kvm", "", "", "show KVM information")
    def info_kvm(ctx):
        k = kvm_info(ctx.machine)
        if k["present"]:
            ctx.print("kvm support: " + ("enabled" if k["enabled"] else "disabled"))
            ctx.print("memory encryption: " + ("enabled" if ctx.machine.config.memory_encryption else "disabled"))
        else:
            ctx.print("kvm support: not compiled")
