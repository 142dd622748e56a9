"""One registration mechanism for every registry (policies, backends, eval methods)."""

from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T", bound=type)


def registrar(table: dict[str, type], attr: str) -> Callable[[str], Callable[[T], T]]:
    """A decorator factory: ``@register("x")`` files a class under ``"x"`` in ``table`` and sets its ``attr`` to ``"x"``."""

    def register(name: str) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            setattr(cls, attr, name)
            table[name] = cls
            return cls

        return wrap

    return register
