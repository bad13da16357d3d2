"""One flat registry from name to constructor."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from fgvc.errors import UserError

T = TypeVar("T", bound=Callable)


class Registry(Generic[T]):
    """Maps names to constructors; a duplicate name fails, a miss lists the known names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = fn
            return fn

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(f"unknown {self.kind} '{name}'; {hint}known: {', '.join(sorted(self._items))}")
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))
