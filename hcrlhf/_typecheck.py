"""Checking config values against dataclass type hints (shared by SafeRLConfig and the pipeline config).

Only what configs use: bool, int, float, str, None, Any, unions (``X | None``), ``list[X]`` (each
element checked) and ``dict``. bool is never accepted as a number.
"""

from __future__ import annotations

import typing


def type_name(hint, none_name: str = "None") -> str:
    """A readable name of a type hint for error messages ("float | None", "list[str]")."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list and args:
        return f"list[{type_name(args[0], none_name)}]"
    if origin is dict:
        return "dict"
    if args:
        return " | ".join(type_name(a, none_name) for a in args)
    return none_name if hint is type(None) else getattr(hint, "__name__", str(hint))


def matches(value, hint) -> bool:
    """True when `value` is of type `hint`."""
    if hint is typing.Any:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, dict):
        if not isinstance(value, origin):
            return False
        return origin is dict or not args or all(matches(v, args[0]) for v in value)
    if args:  # a union
        return any(matches(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def coerce_yaml(value, hint):
    """YAML conveniences for a float field: a numeric string ("1e-6", which PyYAML leaves a string)
    or an int becomes a float. Anything else is returned unchanged (check it with :func:`matches`)."""
    allowed = typing.get_args(hint) or (hint,)
    if float in allowed and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if float in allowed and int not in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
