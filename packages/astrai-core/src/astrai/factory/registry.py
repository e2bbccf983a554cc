"""`Registry`: a named table of components with an optional category and priority."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RegistryEntry:
    """One registered component and the metadata it was registered with."""

    component: Any
    category: str | None = None
    priority: int = 0


class Registry:
    """Maps names to components. Names are unique; lookups of unknown names list what exists."""

    def __init__(self, kind: str = "component") -> None:
        self.kind = kind  # used in error messages only, e.g. "strategy"
        self._entries: dict[str, RegistryEntry] = {}

    def register(self, name: str, component_cls: Any, category: str | None = None, priority: int = 0) -> None:
        """Add `component_cls` under `name`; `category` and `priority` are metadata for the `list_by_*` views."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise TypeError(f"priority of {self.kind} {name!r} must be an int, got {priority!r}")
        if name in self._entries:
            existing = self._entries[name].component
            raise ValueError(f"{self.kind} {name!r} is already registered (by {_qualname(existing)})")
        self._entries[name] = RegistryEntry(component_cls, category, priority)

    def get(self, name: str) -> Any:
        return self.get_entry(name).component

    def get_entry(self, name: str) -> RegistryEntry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {self.list_names()}") from None

    def contains(self, name: str) -> bool:
        return name in self._entries

    __contains__ = contains

    def __len__(self) -> int:
        return len(self._entries)

    def list_names(self) -> list[str]:
        """All names, sorted alphabetically."""
        return sorted(self._entries)

    def list_by_category(self, category: str | None) -> list[str]:
        """Names registered under `category`, sorted alphabetically."""
        return sorted(n for n, e in self._entries.items() if e.category == category)

    def list_by_priority(self, reverse: bool = False) -> list[str]:
        """Names by priority, ascending (descending with `reverse`); ties keep registration order."""
        names = list(self._entries)  # registration order; sorted() is stable
        if reverse:
            return sorted(names, key=lambda n: -self._entries[n].priority)
        return sorted(names, key=lambda n: self._entries[n].priority)


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"
