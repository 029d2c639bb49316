"""Name → constructor registries for models, methods and datasets (the timm / torchvision pattern)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from locallearn.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of constructors.

    ``register`` raises on duplicate names (torchvision); ``create`` drops ``None`` keyword arguments so callers can
    pass optional CLI values straight through (timm), and raises a :class:`UserError` that lists the known names.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._table: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(fn: Callable[..., T]) -> Callable[..., T]:
            if name in self._table:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._table[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._table[name]
        except KeyError:
            raise UserError(f"unknown {self.kind} {name!r}: choose one of {', '.join(self.names())}") from None

    def create(self, name: str, **kwargs: Any) -> T:
        return self.get(name)(**{k: v for k, v in kwargs.items() if v is not None})

    def names(self) -> list[str]:
        return sorted(self._table)

    def __contains__(self, name: str) -> bool:
        return name in self._table
