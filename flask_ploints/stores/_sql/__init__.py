"""A dedupe store in a SQL database, through SQLAlchemy Core.

Needs SQLAlchemy 2: ``pip install 'flask-ploints[sqlalchemy]'``, plus the
database's driver (psycopg 3 for PostgreSQL).
"""

from __future__ import annotations

try:
    import sqlalchemy  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "SQLAlchemyStore needs SQLAlchemy 2; install it with:"
        " pip install 'flask-ploints[sqlalchemy]'"
    ) from exc

from .store import SQLAlchemyStore
from .tables import engine_from_url
from .tables import ensure_table

__all__ = ["SQLAlchemyStore", "engine_from_url", "ensure_table"]
