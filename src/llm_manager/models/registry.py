"""Model names and aliases: resolution of a name in a URL or a request's ``model`` field."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import Generic, TypeVar

from llm_manager.errors import ModelNotFound

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps every name and alias to one item. Immutable after construction.

    Resolution order (contract §3): exact name or alias; the same ignoring case;
    a unique prefix (ignoring case) of a name or alias.
    """

    def __init__(self, entries: Iterable[tuple[str, list[str], T]]) -> None:
        self._items: dict[str, T] = {}
        self._exact: dict[str, str] = {}
        self._folded: dict[str, str] = {}
        for name, aliases, item in entries:
            self._items[name] = item
            for alias in (name, *aliases):
                self._exact[alias] = name
                self._folded.setdefault(alias.casefold(), name)
        # Sorted folded aliases: the ones a prefix starts are one contiguous run (bisect),
        # so a prefix or an unknown name costs O(log n), not a scan of every alias.
        self._sorted = sorted(self._folded)

    @property
    def names(self) -> list[str]:
        return list(self._items)

    def items(self) -> list[tuple[str, T]]:
        return list(self._items.items())

    def values(self) -> list[T]:
        return list(self._items.values())

    def get(self, name: str) -> T | None:
        """The item of an exact configured name, or None."""
        return self._items.get(name)

    def __len__(self) -> int:
        return len(self._items)

    def resolve_name(self, name: str) -> str:
        if name in self._exact:
            return self._exact[name]
        folded = name.casefold()
        if folded in self._folded:
            return self._folded[folded]
        if folded:
            owners: set[str] = set()
            at = bisect_left(self._sorted, folded)
            while at < len(self._sorted) and self._sorted[at].startswith(folded):
                owners.add(self._folded[self._sorted[at]])
                at += 1
            if len(owners) == 1:
                return owners.pop()
            if len(owners) > 1:
                raise ModelNotFound(name, self.names, ambiguous=sorted(owners))
        raise ModelNotFound(name, self.names)

    def resolve(self, name: str) -> T:
        return self._items[self.resolve_name(name)]
