"""Name -> component registries with typed parameter dataclasses.

One name everywhere: ``attacks/wanet.py`` registers ``wanet``, which is also the YAML file
``conf/attack/wanet.yaml``, the CSV value and the override ``attack=wanet``.
"""

from __future__ import annotations

import dataclasses
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
    kwargs = {}
    for key, value in values.items():
        ftype = fields[key].type
        default = fields[key].default
        factory = fields[key].default_factory
        if default is dataclasses.MISSING and factory is not dataclasses.MISSING:
            default = factory()
        if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
            value = build_params(type(default), value, f"{owner}.{key}", base=default)
        elif isinstance(value, list):
            value = tuple(value)
        elif isinstance(ftype, str) and ftype == "float" and isinstance(value, int):
            value = float(value)
        kwargs[key] = value
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    except ConfigError as e:  # a dataclass's own validation: say which section it was
        raise ConfigError(f"{owner}: {e}") from None
