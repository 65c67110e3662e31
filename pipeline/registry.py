"""Small registries with checks, in the torch-fidelity manner: a name registered twice, or a class of
the wrong kind, fails loudly at import time instead of silently shadowing another."""

from __future__ import annotations

from typing import Callable, Generic, Optional, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Classes by name. With ``name_attr``, a class is registered under that class attribute, so its name is
    written once, on the class; ``register("name")`` names it explicitly instead."""

    def __init__(self, kind: str, base: type, name_attr: Optional[str] = None) -> None:
        self.kind, self.base, self.name_attr = kind, base, name_attr
        self._items: dict[str, type] = {}

    def register(self, name: Optional[str] = None) -> Callable[[type], type]:
        def add(cls: type) -> type:
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"{self.kind} {name!r} must be a subclass of {self.base.__qualname__}, got {cls!r}")
            key = name or self._own_name(cls)
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is already registered as {self._items[key].__qualname__}")
            self._items[key] = cls
            return cls

        return add

    def _own_name(self, cls: type) -> str:
        inherited = getattr(self.base, self.name_attr, None) if self.name_attr else None
        key = getattr(cls, self.name_attr, None) if self.name_attr else None
        if not isinstance(key, str) or not key or key == inherited:
            raise ValueError(f"{self.kind} {cls.__qualname__} has no name of its own: set its class attribute "
                             f"`{self.name_attr or 'name'}` or register it with register(name)")
        return key

    def __getitem__(self, name: str) -> type:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._items))}")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)
