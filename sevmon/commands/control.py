"""Protocol-level commands: versions, command lists, schema, quit, and the HMP bridge."""

from __future__ import annotations

from sevmon import PACKAGE, QEMU_VERSION
from sevmon.errors import CommandError


def register(registry, hmp, info) -> None:
    schema = registry.schema

    @registry.register("query-version", inline=True)
    def query_version(ctx):
        return ctx.server.version_info()

    @registry.register("query-commands", inline=True)
    def query_commands(ctx):
        return [{"name": n} for n in registry.names()]

    @registry.register("query-qmp-schema", inline=True)
    def query_qmp_schema(ctx):
        return [e for e in schema.introspect()
                if e["meta-type"] != "command" or e["name"] in registry]

    @registry.register("quit")
    def quit_(ctx):
        ctx.machine.quit()
        return {}

    @registry.register("human-monitor-command")
    def human_monitor_command(ctx, command_line, cpu_index=None):
        if cpu_index is not None and not 0 <= cpu_index < len(ctx.machine.cpus):
            raise CommandError("Parameter 'cpu-index' expects a CPU number")
        out = ctx.server.hmp.run(command_line, cpu_index or 0)
        return out.replace("\n", "\r\n")

    registry.register_session_command("qmp_capabilities")

    # -- HMP ---------------------------------------------------------------------------
    @hmp.command("help|?", "name:S?", "[cmd]", "show the help")
    def hmp_help(ctx, name=None):
        ctx.monitor.help(ctx, name)

    @hmp.command("info", "item:s?", "[subcommand]", "show various information about the system state")
    def hmp_info(ctx, item=None):
        ctx.monitor.help(ctx, "info")

    @hmp.command("quit|q", "", "", "quit the emulator")
    def hmp_quit(ctx):
        ctx.machine.quit()

    @info.command("version", "", "", "show the version of QEMU")
    def info_version(ctx):
        major, minor, micro = QEMU_VERSION
        ctx.print(f"{major}.{minor}.{micro}{PACKAGE}")
