"""Name -> component registries with typed parameter dataclasses.

One name everywhere: ``attacks/wanet.py`` registers ``wanet``, which is also the YAML file
``conf/attack/wanet.yaml``, the CSV value and the override ``attack=wanet``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from bench.errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    params: type | None
    check: Callable[[Any], None] | None = None


class Registry(Generic[T]):
    """A named collection of components, each with an optional frozen params dataclass."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, params: type | None = None,
                 check: Callable[[Any], None] | None = None) -> Callable[[T], T]:
        """``check(params)`` (optional) raises ``ConfigError`` on values the component cannot
        run with; ``params`` calls it, so a bad value fails when the config is built."""
        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._entries[name] = Entry(name, obj, params, check)
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} '{name}'; known: {', '.join(self.names())}")
        return self._entries[name]

    def params(self, name: str, values: Mapping[str, Any] | None) -> Any:
        """Build the params dataclass of ``name`` from a mapping; unknown keys and values its
        check rejects are an error."""
        entry = self.get(name)
        params = build_params(entry.params, values or {}, f"{self.kind} '{name}'")
        if entry.check is not None:
            entry.check(params)
        return params


class _Mismatch(Exception):
    pass


def _convert(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (ints widen to float, lists become tuples), or ``_Mismatch``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _convert(value, arg)
                except _Mismatch:
                    pass
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is str:  # results_dir=2024 arrives as an int from the command line
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch
    if tp is int or tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool) and (
                tp is float or isinstance(value, int)):
            return tp(value)
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _Mismatch
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0]) for v in value)
        if len(args) != len(value):
            raise _Mismatch
        return tuple(_convert(v, a) for v, a in zip(value, args, strict=True))
    if tp in (dict, list) or origin in (dict, list):
        if isinstance(value, origin or tp):
            return value
        raise _Mismatch
    if dataclasses.is_dataclass(tp) and isinstance(value, tp):
        return value
    raise _Mismatch


def typed(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the annotation ``tp``; a ``ConfigError`` naming ``where``
    and the expected type otherwise (``attack.target=1.5`` must not become class 1)."""
    try:
        return _convert(value, tp)
    except _Mismatch:
        name = (str(tp).replace("typing.", "") if typing.get_origin(tp)
                else getattr(tp, "__name__", str(tp)))
        raise ConfigError(f"{where} must be {name}, got {value!r}") from None


def build_params(cls: type | None, values: Mapping[str, Any], owner: str,
                 base: Any = None) -> Any:
    """Instantiate a (possibly nested) frozen dataclass from a plain mapping, strictly. Keys
    the mapping leaves out keep ``base``'s values (a nested section's default instance, e.g.
    ABL's isolation recipe), else the class defaults."""
    if cls is None:
        if values:
            raise ConfigError(f"{owner} takes no parameters; got {', '.join(sorted(values))}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} for {owner}; valid: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        default = fields[key].default
        factory = fields[key].default_factory
        if default is dataclasses.MISSING and factory is not dataclasses.MISSING:
            default = factory()
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            value = build_params(type(default), value, f"{owner}.{key}", base=default)
        else:
            value = typed(value, hints[key], f"{owner}.{key}")
        kwargs[key] = value
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    except ConfigError as e:  # a dataclass's own validation: say which section it was
        raise ConfigError(f"{owner}: {e}") from None
