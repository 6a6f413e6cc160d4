"""Load nested dataclass configs from YAML files plus ``key.sub=value`` overrides.

YAML files hold overrides of the dataclass defaults only. Unknown keys are errors that name the
full dotted key and list the valid ones; values are validated by each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = ["from_dict", "load_config", "parse_overrides", "to_dict"]

T = TypeVar("T")


def _dataclass_type(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def from_dict(cls: type[T], data: dict | None, path: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, recursing into dataclass-typed fields."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        if key not in fields:
            raise ValueError(f"unknown config key {full!r}; valid keys here: {', '.join(sorted(fields))}")
        sub = _dataclass_type(hints[key])
        if sub is not None and isinstance(value, dict):
            custom = getattr(sub, "from_dict", None)
            try:
                kwargs[key] = custom(value) if custom is not None else from_dict(sub, value, full)
            except ValueError as e:
                raise ValueError(f"{full}: {e}") from None
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path + ': ' if path else ''}{e}") from None


def to_dict(obj: Any) -> dict:
    """Plain nested dict of a dataclass config (for logging and saving)."""
    return dataclasses.asdict(obj)


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=3", "c=[1,2]"]`` -> ``{"a": {"b": 3}, "c": [1, 2]}`` (values parsed as YAML)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with an earlier override of {p!r}")
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of ``cls``, then the YAML file at ``path``, then ``overrides``."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {p} must contain a mapping at the top level")
    return from_dict(cls, _merge(data, parse_overrides(overrides or [])))
