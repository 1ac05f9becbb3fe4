"""Strict conversion between plain data (YAML) and typed dataclasses.

The config loader's machinery, kept apart from the config classes themselves. Every error is a
`ConfigError` (a `ValueError`) whose message names the dotted key, the offending value and what
would be valid. Supported field types: bool, int, float, str, `Literal[...]`, `X | None`,
`list[X]`, `tuple[X, ...]` and nested dataclasses.

Coercions are deliberately few: an int is accepted where a float is expected, and a string that
spells a float (PyYAML reads `1e-3` as a string) is accepted for a float field. A bool is never an
int and an int is never a bool.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

T = TypeVar("T")

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^[+-]?(inf|nan)$", re.I)


class ConfigError(ValueError):
    """Invalid configuration: unknown key, wrong type or invalid value."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _fail(key: str, value: Any, tp: Any) -> ConfigError:
    return ConfigError(
        f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to type `tp`, or raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value in allowed and type(value) in {type(a) for a in allowed}:
            return value
        raise ConfigError(
            f"{key}: invalid value {value!r}; expected one of {', '.join(map(repr, allowed))}"
        )
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _fail(key, value, tp)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise _fail(key, value, tp)
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        if not isinstance(value, (list, tuple)):
            raise _fail(key, value, tp)
        items = [coerce(v, args[0], f"{key}[{i}]") if args else v for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise _fail(key, value, tp)
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(key, value, tp)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(key, value, tp)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)
        raise _fail(key, value, tp)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(key, value, tp)
    raise ConfigError(f"{key}: unsupported field type {tp!r}")  # a bug in a config class


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types.

    Errors raised by the dataclass's own `__post_init__` validation are re-raised as ConfigError
    with the section prefix added.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown config key {key!r}{hint} (valid keys in "
                f"{prefix or 'the top level'}: {', '.join(sorted(fields))})"
            )
        kwargs[name] = coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix}: {e}" if prefix else str(e)) from e


def to_dict(obj: Any) -> Any:
    """Plain-data (YAML-safe) view of a dataclass tree: tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def field_type(cls: type, dotted: str) -> tuple[Any, list[str]]:
    """Resolve `section.key` (any depth) to (field type, path parts) or raise ConfigError."""
    parts = dotted.split(".")
    tp: Any = cls
    for i, part in enumerate(parts):
        if get_origin(tp) in (Union, types.UnionType):  # Optional[Section]
            tp = next((a for a in get_args(tp) if dataclasses.is_dataclass(a)), tp)
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"--set {dotted}: {'.'.join(parts[:i])} is not a section")
        names = [f.name for f in dataclasses.fields(tp) if f.init]
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(
                f"unknown config key {'.'.join(parts[: i + 1])!r}{hint} "
                f"(valid keys in {where}: {', '.join(sorted(names))})"
            )
        tp = _hints(tp)[part]
    return tp, parts


def set_path(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set data[p0][p1]...[pn] = value, creating intermediate mappings."""
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


__all__ = ["ConfigError", "coerce", "field_type", "from_dict", "set_path", "to_dict"]
