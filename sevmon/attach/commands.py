"""The command set of an attached sevmon: the memory commands are sevmon's own, the rest
is QEMU's (forwarded).

Owned, QMP: ``memsave``, ``pmemsave``, ``dump-guest-memory`` (and its ``query-dump``),
``query-sev-debug-stats``, ``query-guest-kernel``, ``query-commands``/``query-qmp-schema`` (QEMU's list plus
sevmon's), and ``human-monitor-command`` for owned lines. Owned, HMP: ``x``, ``xp``,
``gva2gpa``, ``memsave``, ``pmemsave``, ``dump-guest-memory``, ``info mem``, ``info tlb``,
``info sev-debug``, ``info dump``, ``info guest-kernel``, and ``info kvm`` (QEMU's text plus the
``memory encryption:`` line). Everything else goes to QEMU.
"""

from __future__ import annotations

from sevmon.attach.forward import AttachedMonitor, QmpForwarder
from sevmon.errors import CommandError
from sevmon.hmp.table import CommandTable, HmpCommand
from sevmon.qmp.dispatch import CommandRegistry
from sevmon.qmp.schema import BUILTINS, Schema

OWNED_QMP = ("memsave", "pmemsave", "dump-guest-memory", "query-dump", "query-sev-debug-stats",
             "query-sev-memory-map", "sev-mem-map", "query-guest-kernel")
OWNED_HMP = ("x", "xp", "gva2gpa", "memsave", "pmemsave", "dump-guest-memory", "sev-mem-map")
OWNED_INFO = ("mem", "tlb", "sev-debug", "dump", "sev-mem", "guest-kernel")
_TYPE_KEYS = ("arg-type", "ret-type", "element-type", "type")


def build_attached(runner) -> tuple[CommandRegistry, AttachedMonitor]:
    machine = runner.machine
    from sevmon.commands import dump, guest_kernel, memory, sev_memory_map

    full = CommandRegistry(Schema())
    all_hmp, all_info = CommandTable(), CommandTable()
    for module in (memory, dump, sev_memory_map, guest_kernel):
        module.register(full, all_hmp, all_info)
    registry = CommandRegistry(full.schema)
    for name in OWNED_QMP:
        registry.register(name, inline=name in full.inline)(full.handlers[name])
    hmp, info = CommandTable(), CommandTable()
    for c in all_hmp.commands:
        if c.names[0] in OWNED_HMP:
            hmp.add(c)
    for c in all_info.commands:
        if c.names[0] in OWNED_INFO:
            info.add(c)
    link = machine.link
    # the parent of sevmon's info items; any other info line (a bare "info" too) is QEMU's
    hmp.add(HmpCommand("info", "item:s?", "[subcommand]", "show various information about the system state",
                       lambda ctx, item=None: ctx.print(ctx.monitor.qemu("info", ctx.cpu_index), end="")))

    @info.command("kvm", "", "", "show KVM information")
    def info_kvm(ctx):
        out = link.call_sync(link.hmp("info kvm", ctx.cpu_index))
        ctx.print(out, end="")
        if out.startswith("kvm support: enabled") or out.startswith("kvm support: disabled"):
            ctx.print("memory encryption: " + ("enabled" if machine.config.memory_encryption else "disabled"))

    monitor = AttachedMonitor(runner, hmp, info, link)
    forwarder = QmpForwarder(link, registry, monitor, len(machine.cpus))
    registry.forwarder = forwarder

    @registry.register("human-monitor-command")
    def human_monitor_command(ctx, command_line, cpu_index=None):
        out = ctx.server.hmp.run(command_line, cpu_index or 0)
        return out.replace("\n", "\r\n")

    registry.register_session_command("qmp_capabilities")

    @registry.register("query-commands")
    def query_commands(ctx):
        qemu = _qemu(link, "query-commands")
        have = {c["name"] for c in qemu}
        return qemu + [{"name": n} for n in registry.names() if n not in have]

    @registry.register("query-qmp-schema")
    def query_qmp_schema(ctx):
        qemu = _qemu(link, "query-qmp-schema")
        have = {e["name"] for e in qemu if e.get("meta-type") == "command"}
        return qemu + own_schema_entries(registry, have)

    return registry, monitor


def _qemu(link, name: str):
    reply = link.call_sync(link.raw({"execute": name}))
    if "error" in reply:
        raise CommandError(reply["error"]["desc"], reply["error"]["class"])
    return reply["return"]


def own_schema_entries(registry: CommandRegistry, qemu_commands: set[str]) -> list[dict]:
    """sevmon's commands that QEMU lacks, with the types they use, renamed ``sevmon-N`` so
    they cannot clash with QEMU's own numbered type names."""
    mine = registry.schema.introspect()
    by_name = {e["name"]: e for e in mine}
    picked = [e for e in mine if e["meta-type"] == "command" and e["name"] in registry
              and e["name"] not in qemu_commands]

    def rename(n: str) -> str:
        return n if n in BUILTINS or n == "int" or not n.isdigit() else f"sevmon-{n}"

    seen: set[str] = set()
    out: list[dict] = []

    def visit(entry: dict, is_type: bool) -> None:
        e = dict(entry)
        if is_type:
            e["name"] = rename(e["name"])
        refs = []
        for k in _TYPE_KEYS:
            if isinstance(e.get(k), str):
                refs.append(e[k])
                e[k] = rename(e[k])
        for key in ("members", "variants"):  # enum members carry only a name
            if key in e:
                e[key] = [dict(m, type=rename(m["type"])) if "type" in m else m for m in e[key]]
                refs += [m["type"] for m in entry[key] if "type" in m]
        out.append(e)
        for r in refs:
            if r not in seen and r in by_name and by_name[r]["meta-type"] not in ("command", "event"):
                seen.add(r)
                if rename(r) != r:
                    visit(by_name[r], True)

    for c in picked:
        visit(c, False)
    return out
