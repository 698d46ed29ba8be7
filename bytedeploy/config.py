"""Dataclass configs <-> plain dicts (JSON), strictly: unknown keys are an error, not silently dropped."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from bytedeploy.errors import UserError

T = TypeVar("T")


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type[T], values: dict[str, Any], what: str = "config") -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UserError(f"unknown {what} field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        default = fields[k].default
        if isinstance(v, list) and isinstance(default, tuple):
            v = tuple(v)
        kwargs[k] = v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad {what}: {e}") from None


def parse_overrides(pairs: tuple[str, ...] | list[str], cls) -> dict[str, Any]:
    """'key=value' strings -> typed dict for the dataclass cls (values parsed as the field's default type)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        key = key.strip().replace("-", "_")
        if key not in fields:
            raise UserError(f"unknown model option {key!r}; known: {', '.join(sorted(fields))}")
        out[key] = parse_value(raw, fields[key].default, key)
    return out


def parse_value(raw: str, default: Any, key: str) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError:
        raise UserError(f"option {key}: cannot read {raw!r} as {type(default).__name__}") from None
    return raw
