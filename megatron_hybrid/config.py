"""Load nested dataclass configs from YAML files plus ``key.sub=value`` overrides.

YAML files hold overrides of the dataclass defaults only. Unknown keys are errors that name the
full dotted key and list the valid ones; values are validated by each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

__all__ = [
    "check_int",
    "check_number",
    "from_dict",
    "load_config",
    "parse_overrides",
    "to_dict",
]

T = TypeVar("T")


class _YAMLLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` (exponent, no dot) as a float, as YAML 1.2 does."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False):
    """A mapping that names a key twice is an error (PyYAML keeps the last value silently).

    Checked on the mapping's own keys, before merge keys (``<<: *anchor``) are expanded: a key
    that overrides a merged one is the point of a merge, not a duplicate.
    """
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, typing.Hashable):
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found the key {key!r} twice",
                    key_node.start_mark,
                )
            seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_YAMLLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YAMLLoader)


#: Scalar and container field types that :func:`from_dict` checks values against.
_SCALARS: dict[Any, tuple[tuple[type, ...], str]] = {
    bool: ((bool,), "true or false"),
    int: ((int,), "an integer"),
    float: ((int, float), "a number"),
    str: ((str,), "a string"),
    list: ((list, tuple), "a list"),
    tuple: ((list, tuple), "a list"),
    dict: ((dict,), "a mapping"),
}


def _type_problem(tp: Any, value: Any) -> str | None:
    """What ``value`` should be for a field annotated ``tp`` (None when it fits, or when ``tp``
    is not a plain scalar / container type, possibly optional: those fields check themselves)."""
    args = typing.get_args(tp)
    if _is_optional(tp):
        if value is None:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            return None
        tp = rest[0]
    rule = _SCALARS.get(typing.get_origin(tp) or tp)
    if rule is None:
        return None
    allowed, what = rule
    if isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool)):
        return None
    return what  # from_dict adds "or null" for optional fields


def _is_optional(tp: Any) -> bool:
    union = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    return union and type(None) in typing.get_args(tp)


def _dataclass_type(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return tp
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def check_int(key: str, value: object, *, minimum: int = 1, optional: bool = False) -> None:
    """ValueError naming ``key`` unless ``value`` is an int >= ``minimum`` (None too when
    ``optional``). Booleans are refused: YAML reads ``yes`` / ``true`` as True, which Python would
    otherwise count as 1."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{key} must be {what}{' or null' if optional else ''}, got {value!r}")


def check_number(key: str, value: object, ok: Callable[[float], bool], what: str) -> None:
    """ValueError naming ``key`` unless ``value`` is a finite int or float (not a bool, NaN or
    infinity) for which ``ok`` holds; ``what`` says the condition in the message (``"> 0"``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not ok(value)
    ):
        raise ValueError(f"{key} must be a number {what}, got {value!r}")


def check_known_keys(cls: type, data: dict, path: str = "") -> None:
    """ValueError naming the first key of ``data`` that is not a field of dataclass ``cls`` (and,
    for a learning rate asked for where a section keeps it per mode, where it is)."""
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    fields = set(by_name)
    for key in data:
        if key not in fields:
            full = f"{path}.{key}" if path else key
            hint = ""
            if key in ("lr", "learning_rate"):
                modes = by_name.get("modes")
                per_mode = modes is not None and modes.default_factory is not dataclasses.MISSING
                if per_mode and isinstance(modes.default_factory(), dict):  # a stage section
                    hint = (
                        f"; learning rates are per mode: {path}.modes.<mode>.lr (and lora_lr_mult)"
                    )
                elif {"sft", "grpo"} <= fields:  # a job with stage sections
                    hint = (
                        "; learning rates are per mode: sft.modes.<mode>.lr, grpo.modes.<mode>.lr"
                    )
            raise ValueError(
                f"unknown config key {full!r}; valid keys here: {', '.join(sorted(fields))}" + hint
            )


def from_dict(cls: type[T], data: dict | None, path: str = "", base: T | None = None) -> T:
    """Build dataclass ``cls`` from a mapping, recursing into dataclass-typed fields.

    Keys absent from ``data`` keep the values of ``base`` (default: ``cls``'s field defaults); a
    nested section starts from the parent's default for that field, so a section overrides only
    the keys it names.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_known_keys(cls, data, path)
    kwargs: dict[str, Any] = {}
    wrong_type: list[str] = []
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        sub = _dataclass_type(hints[key])
        if sub is None:
            problem = _type_problem(hints[key], value)
            if problem:
                optional = " or null" if _is_optional(hints[key]) else ""
                wrong_type.append(f"{full} must be {problem}{optional}, got {value!r}")
            kwargs[key] = value
            continue
        if isinstance(value, sub) or (value is None and _is_optional(hints[key])):
            kwargs[key] = value
            continue
        if value is None:  # an empty section (``model:`` with every key commented out)
            value = {}
        if not isinstance(value, dict):
            raise ValueError(f"{full}: expected a mapping, got {type(value).__name__} {value!r}")
        default = getattr(base, key) if base is not None else _field_default(fields[key])
        default = default if isinstance(default, sub) else None
        custom = getattr(sub, "from_dict", None)
        if custom is None:
            kwargs[key] = from_dict(sub, value, full, default)
            continue
        try:
            kwargs[key] = custom(value) if default is None else custom(value, base=default)
        except ValueError as e:
            raise ValueError(f"{full}: {e}") from None
    missing = [
        f"{path}.{name}" if path else name
        for name, f in fields.items()
        if f.init
        and name not in kwargs
        and base is None
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
    # The class's own validation speaks first (its messages say more: "a positive integer");
    # a value of the wrong type that it does not check, or that crashes it, is named here.
    try:
        obj = dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{path + ': ' if path else ''}{e}") from None
    except (TypeError, AttributeError) as e:
        raise ValueError(
            wrong_type[0] if wrong_type else f"{path + ': ' if path else ''}{e}"
        ) from None
    if wrong_type:
        raise ValueError(wrong_type[0])
    return obj


def to_dict(obj: Any) -> dict:
    """Plain nested dict of a dataclass config (for logging and saving)."""
    return dataclasses.asdict(obj)


def parse_overrides(items: list[str]) -> dict:
    """``["a.b=3", "c=[1,2]"]`` -> ``{"a": {"b": 3}, "c": [1, 2]}`` (values parsed as YAML;
    a bare ``#`` or ``-``, which YAML reads as null, stays the character)."""
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
        try:
            value = _load_yaml(raw)
        except yaml.YAMLError as e:
            raise ValueError(
                f"override {item!r}: the value is not valid YAML (quote it): {e}"
            ) from None
        # YAML reads a bare ``#`` as a comment (None) and ``-`` as a list of one null; on a
        # command line they mean the characters (operator symbols, for instance).
        if value in (None, [None]) and raw.strip() not in _NULLS:
            value = raw.strip()
        node[parts[-1]] = value
    return out


_NULLS = frozenset({"", "~", "null", "Null", "NULL"})


def parse_number_list(flag: str, text: str | None, kind: type = float) -> list | None:
    """``"1e-3,3e-3"`` -> ``[0.001, 0.003]`` (``kind`` int or float); None stays None.

    ValueError naming ``flag`` for anything else, the empty string included.
    """
    if text is None:
        return None
    try:
        return [kind(x) for x in text.split(",")]
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ValueError(f"{flag} must be comma-separated {what}, got {text!r}") from None


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(
    cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None
) -> T:
    """Defaults of ``cls``, then the YAML file at ``path``, then ``overrides``."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        try:
            data = _load_yaml(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"config file {p} must contain a mapping at the top level")
    return from_dict(cls, _merge(data, parse_overrides(overrides or [])))
