"""QMP dispatch: envelope checks, command lookup, argument checking — in QEMU's order.

The dispatcher knows no command: handlers are registered into a ``CommandRegistry``
(by the ``sevmon.commands`` modules) and argument checking comes from the schema. The
order of checks follows ``qapi/qmp-dispatch.c``: not-an-object, then ``id`` is captured,
envelope members, lookup (CommandNotFound), OOB permission, arguments, handler.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sevmon.errors import COMMAND_NOT_FOUND, CommandError
from sevmon.qmp.errors import to_wire
from sevmon.qmp.qdict_order import qdict_order
from sevmon.qmp.schema import Schema

NO_ID = object()  # marks "the request had no id" (None is a valid id: JSON null)


@dataclass
class Request:
    """A checked request: what to run, with which arguments, and the id to echo."""

    name: str
    args: dict
    id: object
    oob: bool
    forward: bool = False  # not sevmon's: the registry's forwarder passes it on as it came


class CommandRegistry:
    """name -> handler(ctx, **args). Handlers raise CommandError; return JSON-able values."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self.handlers: dict[str, Callable] = {}
        self.inline: set[str] = set()
        self._names: list[str] = []  # registration order, session commands included
        # Attached to a QEMU: an object with wants(name, arguments) -> bool and
        # async forward(ctx, request); requests it wants skip sevmon's schema checks.
        self.forwarder = None

    def register(self, name: str, *, inline: bool = False):
        """``inline``: the handler only reads state that is safe to read without the machine
        lock (run state, versions, counters), so it answers at once even while another
        client's long command holds the machine thread."""
        if name not in self.schema.commands:
            raise KeyError(f"command {name} has no schema in schemas/")

        def deco(fn):
            self.handlers[name] = fn
            self._names.append(name)
            if inline:
                self.inline.add(name)
            return fn
        return deco

    def register_session_command(self, name: str) -> None:
        """A command the session answers itself (``qmp_capabilities``): listed and schema-checked like the
        others, but never dispatched to the machine."""
        if name not in self.schema.commands:
            raise KeyError(f"command {name} has no schema in schemas/")
        self._names.append(name)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def names(self) -> list[str]:
        return list(self._names)


def check_request(msg, *, negotiated: bool, oob_enabled: bool, registry: CommandRegistry) -> Request:
    """Turn a parsed message into a Request or raise (CommandError, id)."""
    if not isinstance(msg, dict):
        raise _Fail(CommandError("QMP input must be a JSON object"), NO_ID)
    rid = msg.get("id", NO_ID)
    exec_key = None
    for key in qdict_order(msg):  # QEMU reports the first failure in its QDict's order
        value = msg[key]
        if key == "execute" or (key == "exec-oob" and oob_enabled):
            if not isinstance(value, str):
                raise _Fail(CommandError(f"QMP input member '{key}' must be a string"), rid)
            if exec_key is not None:
                raise _Fail(CommandError(f"QMP input member '{key}' clashes with '{exec_key}'"), rid)
            exec_key = key
        elif key == "arguments":
            if not isinstance(value, dict):
                raise _Fail(CommandError("QMP input member 'arguments' must be an object"), rid)
        elif key != "id":
            raise _Fail(CommandError(f"QMP input member '{key}' is unexpected"), rid)
    if exec_key is None:
        raise _Fail(CommandError("QMP input lacks member 'execute'"), rid)
    name = msg[exec_key]
    oob = exec_key == "exec-oob"
    if negotiated and registry.forwarder is not None and registry.forwarder.wants(name, msg.get("arguments")):
        return Request(name, msg.get("arguments", {}), rid, oob, forward=True)
    available = ("qmp_capabilities",) if not negotiated else registry
    if name not in available or name not in registry:
        if not negotiated:
            raise _Fail(CommandError("Expecting capabilities negotiation with 'qmp_capabilities'",
                                 COMMAND_NOT_FOUND), rid)
        raise _Fail(CommandError(f"The command {name} has not been found", COMMAND_NOT_FOUND), rid)
    if oob and not registry.schema.commands[name].allow_oob:
        raise _Fail(CommandError(f"The command {name} does not support OOB"), rid)
    try:
        args = registry.schema.check_arguments(name, msg.get("arguments", {}))
    except CommandError as e:
        raise _Fail(e, rid) from None
    return Request(name, args, rid, oob)


class _Fail(Exception):
    def __init__(self, error: CommandError, rid):
        super().__init__(error.desc)
        self.error = error
        self.id = rid


CheckFailed = _Fail


def reply(rid, *, result=NO_ID, error: CommandError | None = None) -> dict:
    """A reply object in QEMU's member order (return first, or id first for errors)."""
    if error is not None:
        out = {} if rid is NO_ID else {"id": rid}
        out["error"] = to_wire(error)
        return out
    out = {"return": result}
    if rid is not NO_ID:
        out["id"] = rid
    return out
