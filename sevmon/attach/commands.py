"""The command set of an attached sevmon, built from what each command declares where it is
registered (``attached=`` in ``sevmon.commands``, see ``sevmon.hmp.table``): sevmon's own
(the memory commands: ``x``, ``xp``, ``gva2gpa``, ``memsave``, ``pmemsave``, ``print``,
``dump-guest-memory``, ``info mem``/``tlb``/``sev-debug``/``sev-mem``/``dump``,
``sev-mem-map``...), QEMU's, or QEMU's but refused when debugging is (QEMU would read guest
memory for it: ``x /i``, ``sum``, ``migrate``, ``savevm``). Every command of the modules
that touch guest memory must declare one: an undeclared one stops the attached build, so a
new memory command cannot silently go to QEMU. Anything sevmon's table does not hold is
QEMU's, forwarded as it came. For an SEV-ES guest ``info registers`` is sevmon's too: QEMU would answer it from its
stale reset state.

Added here: ``help`` and a bare ``info`` (QEMU's text with sevmon's commands merged in),
``info kvm`` (QEMU's text plus the ``memory encryption:`` line), ``human-monitor-command``,
``query-commands``/``query-qmp-schema`` (QEMU's list plus sevmon's), and QEMU's commands
that take expressions (so sevmon evaluates ``$reg`` in them) or read guest memory.
"""

from __future__ import annotations

import dataclasses

from sevmon.attach.forward import AttachedMonitor, QmpForwarder
from sevmon.debug.refusal import qemu_read_refusal
from sevmon.errors import CommandError
from sevmon.hmp.table import OWN, QEMU, QEMU_READS_MEMORY, CommandTable, HmpCommand
from sevmon.qmp.dispatch import CommandRegistry
from sevmon.qmp.schema import BUILTINS, Schema

_TYPE_KEYS = ("arg-type", "ret-type", "element-type", "type")

# QEMU's own commands that sevmon does not implement, declared here, where the attached
# table registers them: QMP ones that read guest memory, HMP ones that take expressions.
QEMU_QMP_READING_MEMORY = ("snapshot-save",)
QEMU_HMP = (HmpCommand("sum", "start:l,size:i", "addr size", "compute the checksum of a memory region",
                       attached=QEMU_READS_MEMORY),
            HmpCommand("gpa2hva", "addr:l", "addr", "print the host virtual address corresponding to a guest "
                       "physical address", attached=QEMU),
            HmpCommand("gpa2hpa", "addr:l", "addr", "print the host physical address corresponding to a guest "
                       "physical address", attached=QEMU))


class UndeclaredCommand(TypeError):
    """A command of a module that touches guest memory says nothing of who runs it attached."""


def check_declared(registry: CommandRegistry, hmp: CommandTable, info: CommandTable) -> None:
    """Every command of these tables says who runs it attached, or UndeclaredCommand names those that do not."""
    undeclared = [n for n in registry.names() if n not in registry.attached]
    undeclared += [c.name for c in hmp.commands + info.commands if c.attached is None]
    if undeclared:
        raise UndeclaredCommand(f"commands that touch guest memory must declare attached=: {', '.join(undeclared)}")


def build_attached(runner) -> tuple[CommandRegistry, AttachedMonitor]:
    machine = runner.machine
    from sevmon.commands import control, dump, guest_kernel, memory, migration, runstate, sev, sev_memory_map

    schema = Schema()
    memory_cmds = _collect(schema, (memory, dump, sev_memory_map, guest_kernel))  # each of these must declare
    other_cmds = _collect(schema, (control, runstate, sev, migration))  # these may (migrate, savevm)
    check_declared(*memory_cmds)

    registry = CommandRegistry(schema)
    reads_memory = set(QEMU_QMP_READING_MEMORY)
    hmp, info = CommandTable(), CommandTable()
    for full, hmp_all, info_all in (memory_cmds, other_cmds):
        for name in full.names():
            if full.attached.get(name) == OWN:
                registry.register(name, inline=name in full.inline, attached=OWN)(full.handlers[name])
            elif full.attached.get(name) == QEMU_READS_MEMORY:
                reads_memory.add(name)
        for c in hmp_all.commands:
            if c.attached is not None:
                hmp.add(c)
        for c in info_all.commands:
            if c.attached is not None:
                if c.names[0] == "registers" and getattr(machine, "registers_encrypted", False):
                    # SEV-ES: QEMU would print its stale reset state; sevmon says the state is encrypted
                    c = dataclasses.replace(c, attached=OWN)
                info.add(c)
    for c in QEMU_HMP:
        hmp.add(c)
    link = machine.link
    monitor = AttachedMonitor(runner, hmp, info, link, lambda: qemu_read_refusal(machine))

    @hmp.command("help|?", "name:S?", "[cmd]", "show the help")
    def hmp_help(ctx, name=None):
        words = name.split() if name else []
        qemu = monitor.qemu("help" + (f" {name}" if name else ""), ctx.cpu_index)
        if not words:
            ctx.print(_merge_help(qemu, hmp.commands, ""), end="")
        elif len(words) == 1 and hmp.find("info").matches(words[0]):
            ctx.print(_merge_help(qemu, info.commands, "info "), end="")
        elif qemu.startswith("unknown command:"):  # one of sevmon's own (sev-mem-map, info sev-debug)
            monitor.help(ctx, name)
        else:
            ctx.print(qemu, end="")

    # the parent of sevmon's info items; any other info line is QEMU's. Bare, it lists QEMU's and sevmon's.
    hmp.add(HmpCommand("info", "item:s?", "[subcommand]", "show various information about the system state",
                       lambda ctx, item=None: ctx.print(_merge_help(monitor.qemu("info", ctx.cpu_index),
                                                                    info.commands, "info "), end="")))
    monitor.table.find("info").sub_table = info.commands

    @info.command("kvm", "", "", "show KVM information")
    def info_kvm(ctx):
        out = link.call_sync(link.hmp("info kvm", ctx.cpu_index))
        ctx.print(out, end="")
        if out.startswith("kvm support: enabled") or out.startswith("kvm support: disabled"):
            ctx.print("memory encryption: " + ("enabled" if machine.config.memory_encryption else "disabled"))

    forwarder = QmpForwarder(link, registry, len(machine.cpus), reads_memory, lambda: qemu_read_refusal(machine))
    registry.forwarder = forwarder

    @registry.register("human-monitor-command")
    def human_monitor_command(ctx, command_line, cpu_index=None):
        out = monitor.run(command_line, cpu_index)
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


def _collect(schema: Schema, modules) -> tuple[CommandRegistry, CommandTable, CommandTable]:
    registry, hmp, info = CommandRegistry(schema), CommandTable(), CommandTable()
    for module in modules:
        module.register(registry, hmp, info)
    return registry, hmp, info


def _merge_help(qemu: str, commands: list[HmpCommand], prefix: str) -> str:
    """QEMU's ``help`` (or ``help info``) text with sevmon's commands that QEMU lacks put in
    QEMU's order (its tables are sorted by name). An entry is a line that starts with a
    command's name and its continuation lines (dump-guest-memory's are indented,
    drive_add's start with ``[``)."""
    entries: list[list[str]] = []
    for line in qemu.splitlines(keepends=True):
        if entries and not line[len(prefix) if line.startswith(prefix) else 0:][:1].isalnum():
            entries[-1].append(line)
        else:
            entries.append([line])

    def key(entry: list[str]) -> str:
        return entry[0][len(prefix):].split(" ", 1)[0] if entry[0].startswith(prefix) else entry[0]

    theirs = {n for e in entries for n in key(e).split("|")}
    for c in commands:
        if c.handler is None or theirs & set(c.names):
            continue
        mine = [f"{prefix}{c.name} {c.params} -- {c.help}\n"]
        at = next((i for i, e in enumerate(entries) if key(e) > c.name), len(entries))
        entries.insert(at, mine)
    return "".join("".join(e) for e in entries)


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
