"""Small registries with checks, in the torch-fidelity manner: a name registered twice, or a class of
the wrong kind, fails loudly at import time instead of silently shadowing another."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, base: type) -> None:
        self.kind, self.base = kind, base
        self._items: dict[str, type] = {}

    def register(self, name: str) -> Callable[[type], type]:
        def add(cls: type) -> type:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered as {self._items[name].__qualname__}")
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise TypeError(f"{self.kind} {name!r} must be a subclass of {self.base.__qualname__}, got {cls!r}")
            self._items[name] = cls
            return cls

        return add

    def __getitem__(self, name: str) -> type:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._items))}")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return sorted(self._items)
