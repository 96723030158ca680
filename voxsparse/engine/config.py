"""Configs checked against the types their classes declare, so a wrong value is a one-line error
naming its key (``trainer.epochs: expected an integer, got 'abc'``) before anything runs.

Two sources of types: a node with ``_target_`` is checked against the type hints of the class it
builds (its ``__init__``, or a dataclass's fields); a tool's own options against a dataclass schema
(:func:`parse_options`). Values are checked as written after interpolation; nothing is coerced.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import types
import typing
from typing import Any, Literal, TypeVar, Union

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A config value of the wrong type or range; the message names its key."""


T = TypeVar("T")
_NUMBER_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def _describe(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _NUMBER_NAMES:
        return _NUMBER_NAMES[annotation]
    if annotation is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list, collections.abc.Sequence):
        inner = [a for a in args if a is not Ellipsis]
        if origin is tuple and inner and Ellipsis not in args:
            return f"a list of {len(inner)} ({', '.join(_describe(a) for a in inner)})"
        return f"a list of {_describe(inner[0])}" if inner else "a list"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    return getattr(annotation, "__name__", str(annotation))


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` (plain: dicts, lists, scalars) fits ``annotation``; unknown types pass."""
    if annotation is Any or annotation is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return value in args
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and Ellipsis not in args:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return not args or all(_matches(v, args[0]) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict) and (
            len(args) != 2 or all(_matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items())
        )
    return True  # a class, a callable, a partial: built from a nested node, checked there


def check_value(value: Any, annotation: Any, key: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``value`` fits ``annotation``."""
    if not _matches(value, annotation):
        raise ConfigError(f"{key}: expected {_describe(annotation)}, got {value!r}")


def _hints(cls: type) -> dict[str, Any]:
    """Declared parameter types of ``cls``'s constructor (empty where they cannot be resolved)."""
    try:
        if dataclasses.is_dataclass(cls):
            return typing.get_type_hints(cls)
        return {k: v for k, v in typing.get_type_hints(cls.__init__).items() if k != "return"}
    except Exception:  # a hint naming something only imported for type checkers
        return {}


def check_types(node: Any, key: str) -> None:
    """Check every ``_target_`` node under ``node`` against its class's declared types.

    Raises:
        ConfigError: naming the dotted key of the first value of the wrong type.
    """
    from hydra.utils import get_class

    node = _plain(node)
    if isinstance(node, dict):
        target = node.get("_target_")
        hints: dict[str, Any] = {}
        if isinstance(target, str):
            try:
                hints = _hints(get_class(target))
            except Exception as exc:
                raise ConfigError(f"{key}._target_: cannot import {target!r} ({exc})") from None
        for name, value in node.items():
            if str(name).startswith("_"):
                continue
            if name in hints:
                check_value(value, hints[name], f"{key}.{name}")
            check_types(value, f"{key}.{name}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            check_types(value, f"{key}[{i}]")


def parse_options(cfg: Any, schema: type[T], key: str = "", strict: bool = False) -> T:
    """``schema`` (a dataclass) filled from the same-named keys of ``cfg``, each checked against its
    declared type; other keys of ``cfg`` are ignored, or refused when ``strict`` (a section that is
    the schema's alone).

    Raises:
        ConfigError: naming the key of a value of the wrong type, or an unknown key when ``strict``.
    """
    values = {}
    hints = typing.get_type_hints(schema)
    names = [field.name for field in dataclasses.fields(schema)]
    unknown = [k for k in cfg if k not in names] if strict else []
    if unknown:
        raise ConfigError(f"{key}{unknown[0]}: unknown key; expected one of {names}")
    for name in names:
        if name not in cfg:
            continue
        value = _plain(cfg[name])
        check_value(value, hints[name], f"{key}{name}")
        values[name] = value
    return schema(**values)
