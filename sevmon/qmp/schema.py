"""The QMP schema: data in ``schemas/*.json`` (QAPI's own JSON dialect), checked here.

Argument checking happens once, before any handler runs, and reproduces QEMU's QObject
input visitor (qapi/qobject-input-visitor.c, qapi/qapi-visit-core.c): members are visited
in declaration order (first missing/mistyped member wins), unknown members are reported
after the known ones, and the error texts are QEMU's own. The same definitions produce
``query-qmp-schema`` in QEMU's SchemaInfo shapes (type names mangled to numbers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from sevmon.errors import CommandError


def _schema_dir():
    """The top-level schemas/ folder, installed (or mapped, in an editable install) as the
    package data ``sevmon.schemas`` (a Traversable); a source tree that was never installed
    falls back to the folder beside the package."""
    try:
        return resources.files("sevmon.schemas")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent.parent / "schemas"


SCHEMA_DIR = _schema_dir()

_INT_RANGES = {
    "int8": (-(1 << 7), (1 << 7) - 1), "int16": (-(1 << 15), (1 << 15) - 1),
    "int32": (-(1 << 31), (1 << 31) - 1), "int64": (-(1 << 63), (1 << 63) - 1),
    "int": (-(1 << 63), (1 << 63) - 1),
}
_UINT_RANGES = {"uint8": 1 << 8, "uint16": 1 << 16, "uint32": 1 << 32}
BUILTINS = {"str": "string", "bool": "boolean", "number": "number", "null": "null", "any": "value",
            **{t: "int" for t in ("int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                                  "uint64", "size")}}
INT64_MIN, INT64_MAX, UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1


@dataclass
class Member:
    name: str
    type: str | list  # a type name, or [name] for an array
    optional: bool


@dataclass
class Definition:
    kind: str          # "command" | "event" | "struct" | "enum"
    name: str
    members: list[Member] = field(default_factory=list)
    values: list[str] = field(default_factory=list)
    returns: str | list | None = None
    allow_oob: bool = False
    allow_preconfig: bool = False
    features: list[str] = field(default_factory=list)


def _members(data: dict | None) -> list[Member]:
    out = []
    for key, typ in (data or {}).items():
        out.append(Member(key.lstrip("*"), typ, key.startswith("*")))
    return out


class Schema:
    """All definitions from a schema directory, by name."""

    def __init__(self, directory=SCHEMA_DIR):
        self.commands: dict[str, Definition] = {}
        self.events: dict[str, Definition] = {}
        self.types: dict[str, Definition] = {}
        files = sorted((f for f in directory.iterdir() if f.name.endswith(".json")), key=lambda f: f.name)
        if not files:
            raise FileNotFoundError(f"no QMP schema (*.json) in {directory}")
        for path in files:
            for item in json.loads(path.read_text()):
                self._add(item)

    def _add(self, item: dict) -> None:
        for kind in ("command", "event", "struct", "enum"):
            if kind in item:
                name = item[kind]
                break
        else:
            raise ValueError(f"unknown schema item {item!r}")
        d = Definition(kind, name, allow_oob=item.get("allow-oob", False),
                       allow_preconfig=item.get("allow-preconfig", False), features=item.get("features", []))
        if kind == "enum":
            d.values = list(item["data"])
        else:
            d.members = _members(item.get("data"))
            d.returns = item.get("returns")
        {"command": self.commands, "event": self.events}.get(kind, self.types)[name] = d

    # -- argument checking (QEMU's input visitor) -------------------------------------
    def check_arguments(self, command: str, args: dict) -> dict:
        """Validate ``args`` for ``command``; return them converted (uint64 wraps negatives).

        Raises CommandError with QEMU's text for the first problem in QEMU's order.
        """
        return self._visit_struct(self.commands[command].members, args, "")

    def _visit_struct(self, members: list[Member], obj: dict, prefix: str) -> dict:
        out = {}
        for m in members:
            full = prefix + m.name
            if m.name not in obj:
                if m.optional:
                    continue
                raise CommandError(f"Parameter '{full}' is missing")
            out[m.name] = self._visit(m.type, obj[m.name], m.name, full)
        for key in obj:
            if key not in out and not any(m.name == key for m in members):
                raise CommandError(f"Parameter '{prefix}{key}' is unexpected")
        return out

    def _visit(self, typ, value, name: str | None, full: str):
        def type_error(expected: str):
            return CommandError(f"Invalid parameter type for '{full}', expected: {expected}")

        if isinstance(typ, list):
            if not isinstance(value, list):
                raise type_error("array")
            return [self._visit(typ[0], v, None, f"{full}[{i}]") for i, v in enumerate(value)]
        shown = name if name is not None else "null"
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if typ == "str":
            if not isinstance(value, str):
                raise type_error("string")
            return value
        if typ == "bool":
            if not isinstance(value, bool):
                raise type_error("boolean")
            return value
        if typ == "number":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise type_error("number")
            return value
        if typ == "null":
            if value is not None:
                raise type_error("null")
            return value
        if typ == "any":
            return value
        if typ in _INT_RANGES:
            if not is_int or not INT64_MIN <= value <= INT64_MAX:
                raise type_error("integer")
            lo, hi = _INT_RANGES[typ]
            if not lo <= value <= hi:
                raise CommandError(f"Parameter '{shown}' expects {typ}")
            return value
        if typ in ("uint64", "size") or typ in _UINT_RANGES:
            base = "size" if typ == "size" else "uint64"
            if not is_int or not INT64_MIN <= value <= UINT64_MAX:
                raise CommandError(f"Parameter '{full}' expects {base}")
            value &= UINT64_MAX  # negative values are accepted for backward compatibility
            if typ in _UINT_RANGES and value >= _UINT_RANGES[typ]:
                raise CommandError(f"Parameter '{shown}' expects {typ}")
            return value
        d = self.types[typ]
        if d.kind == "enum":
            if not isinstance(value, str):
                raise type_error("string")
            if value not in d.values:
                raise CommandError(f"Parameter '{shown}' does not accept value '{value}'")
            return value
        if not isinstance(value, dict):
            raise type_error("object")
        return self._visit_struct(d.members, value, full + ".")

    # -- introspection (query-qmp-schema) ----------------------------------------------
    def introspect(self) -> list[dict]:
        """SchemaInfo list as QEMU's query-qmp-schema returns it: commands and events with
        their argument/return types, then every type they use, non-builtin names mangled
        to numbers in order of first use ("0" is the empty object)."""
        names: dict[str, str] = {}
        pending: list[tuple[str, object]] = []

        def ref(typ) -> str:
            key = "anon:" + typ["anon"] if isinstance(typ, dict) and typ else json.dumps(typ)
            if isinstance(typ, str) and typ in BUILTINS:
                out = "int" if BUILTINS[typ] == "int" else typ
                if key not in names:
                    names[key] = out
                    pending.append((out, typ))
                return names[key]
            if key not in names:
                names[key] = str(len([v for v in names.values() if v.isdigit()]))
                pending.append((names[key], typ))
            return names[key]

        empty = ref({})  # "0": the empty object, used for commands without arguments/returns
        assert empty == "0"
        out: list[dict] = []
        for d in self.commands.values():
            info = {"name": d.name, "ret-type": ref(d.returns if d.returns else {}),
                    "meta-type": "command", "arg-type": ref({"anon": "cmd:" + d.name, "members": d.members} if d.members else {})}
            if d.allow_oob:
                info["allow-oob"] = True
            if d.features:
                info["features"] = list(d.features)
            out.append(info)
        for d in self.events.values():
            out.append({"name": d.name, "meta-type": "event",
                        "arg-type": ref({"anon": "ev:" + d.name, "members": d.members} if d.members else {})})
        seen_builtin: set[str] = set()
        while pending:
            mangled, typ = pending.pop(0)
            if isinstance(typ, str) and typ in BUILTINS:
                if mangled not in seen_builtin:
                    seen_builtin.add(mangled)
                    out.append({"name": mangled, "json-type": BUILTINS[typ], "meta-type": "builtin"})
                continue
            if isinstance(typ, list):
                out.append({"name": mangled, "element-type": ref(typ[0]), "meta-type": "array"})
                continue
            if isinstance(typ, dict):
                members = typ.get("members", [])
            else:
                d = self.types[typ]
                if d.kind == "enum":
                    out.append({"name": mangled, "meta-type": "enum", "values": list(d.values),
                                "members": [{"name": v} for v in d.values]})
                    continue
                members = d.members
            info = {"name": mangled, "members": [], "meta-type": "object"}
            for m in members:
                mi = {"name": m.name, "type": ref(m.type)}
                if m.optional:
                    mi["default"] = None
                info["members"].append(mi)
            out.append(info)
        return out
