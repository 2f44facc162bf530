"""Flat state keys for the model checker: a record's state fields as one tuple, written back
in place.

The checker (``apfsim.check.search``) keeps every state it reaches as a tuple of plain
values and restores a scratch world from it before each step, instead of pickling objects.
Each state class freezes its own fields; :class:`Fields` does it for records whose state is
a fixed list of scalars. ``Fields.of`` takes the list from the dataclass itself, so a field
added later is part of the key unless it is named as excluded (a mutable one makes the key
unhashable, which fails loudly rather than silently merging states).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, is_dataclass
from operator import attrgetter
from typing import Any

__all__ = ["Fields"]


class Fields:
    """A record's scalar state fields: :meth:`freeze` reads them as a tuple, :meth:`thaw`
    writes such a tuple back into an existing record."""

    __slots__ = ("_get", "names")

    def __init__(self, *names: str) -> None:
        self.names = names
        # attrgetter of two or more names returns a tuple; of one, the bare value.
        self._get: Callable[[Any], tuple[Any, ...]] | None = (
            attrgetter(*names) if len(names) > 1 else None
        )

    @classmethod
    def of(cls, record: type, exclude: tuple[str, ...] = ()) -> Fields:
        """Every field of dataclass ``record`` except ``exclude`` (non-state or not scalar)."""
        if not is_dataclass(record):
            raise TypeError(f"{record.__name__} is not a dataclass")
        unknown = set(exclude) - {f.name for f in fields(record)}
        if unknown:
            raise ValueError(f"{record.__name__} has no field {sorted(unknown)}")
        return cls(*[f.name for f in fields(record) if f.name not in exclude])

    def freeze(self, obj: Any) -> tuple[Any, ...]:
        get = self._get
        if get is not None:
            return get(obj)
        return tuple([getattr(obj, name) for name in self.names])

    def thaw(self, obj: Any, values: tuple[Any, ...]) -> None:
        for name, value in zip(self.names, values, strict=True):
            setattr(obj, name, value)
