"""QMP events as one readable line each: ``[event] STOP``, ``[event] SHUTDOWN guest=false ...``."""

from __future__ import annotations

import json
from collections.abc import Mapping

__all__ = ["format_event"]


def _value(v: object) -> str:
    if isinstance(v, str):
        plain = v and v.isprintable() and not any(c.isspace() or c in '"=' for c in v)
        return v if plain else json.dumps(v)  # quoted, control characters escaped
    return json.dumps(v, separators=(", ", ": "))  # bools as true/false, dicts as JSON


def format_event(event: Mapping) -> str:
    """``[event] NAME key=value ...``; nested data is shown as compact JSON, on one line."""
    parts = [f"[event] {event.get('event', '?')}"]
    data = event.get("data")
    if isinstance(data, Mapping):
        parts += [f"{k}={_value(v)}" for k, v in data.items()]
    elif data is not None:
        parts.append(_value(data))
    return " ".join(parts)
