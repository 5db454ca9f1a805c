"""Module-level aliases of names that moved, which warn when used."""

from __future__ import annotations

import importlib
import typing as t
import warnings

__all__ = ["moved"]


def moved(old: str, new: str, names: t.Iterable[str]) -> t.Callable[[str], t.Any]:
    """Return a module ``__getattr__`` for ``old`` that finds ``names`` in
    module ``new`` with a :class:`DeprecationWarning`.
    """
    known = frozenset(names)

    def __getattr__(name: str) -> t.Any:
        if name not in known:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(
            f"{old}.{name} is deprecated; import it from {new}",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(new), name)

    return __getattr__
