"""Dedupe stores, and how ``PLOINTS_DEDUPE_STORE`` picks one.

The value may be a store instance, ``None`` (dedupe off), ``"memory"``, or a
dotted import path (``"myapp.stores:MyStore"``) to a store class or factory
that is called with the app's config.
"""

from __future__ import annotations

import typing as t

from werkzeug.utils import ImportStringError
from werkzeug.utils import import_string

from .base import Claim
from .base import ClaimStatus
from .base import DedupeStore
from .base import StoreError
from .memory import MemoryStore
from .memory import NullStore

__all__ = [
    "Claim",
    "ClaimStatus",
    "DedupeStore",
    "MemoryStore",
    "NullStore",
    "StoreError",
    "store_from_config",
]


def store_from_config(value: object, config: t.Mapping[str, t.Any]) -> DedupeStore:
    """Turn a ``PLOINTS_DEDUPE_STORE`` value into a store.

    :param value: the configured value.
    :param config: the app's config, for store options such as
        ``PLOINTS_MEMORY_STORE_MAX_ENTRIES``.
    :raises ValueError: the value names no store; the message names the key.
    """
    if value is None:
        return NullStore()
    if isinstance(value, DedupeStore):
        return value
    if not isinstance(value, str):
        raise ValueError(
            f"PLOINTS_DEDUPE_STORE must be a store, a name, a URL or None, not {type(value).__name__}"
        )
    if value in ("memory", "memory://"):
        return MemoryStore(max_entries=config["PLOINTS_MEMORY_STORE_MAX_ENTRIES"])
    if value in ("null", "none"):
        return NullStore()
    if "://" not in value and "." in value:
        try:
            factory = import_string(value.replace(":", "."))
        except ImportStringError:
            raise ValueError(f"PLOINTS_DEDUPE_STORE: cannot import {value!r}") from None
        store = factory(config)
        if not isinstance(store, DedupeStore):
            raise ValueError(f"PLOINTS_DEDUPE_STORE: {value!r} did not return a dedupe store")
        return store
    raise ValueError(f"PLOINTS_DEDUPE_STORE: unknown store {value!r}")
