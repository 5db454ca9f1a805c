"""The example's data: customers, balances, tiers, badges, rewards and
campaign conversions in SQLite.
"""

from __future__ import annotations

import sqlite3
import typing as t

SCHEMA = """
CREATE TABLE IF NOT EXISTS customers (
    email TEXT PRIMARY KEY,
    name TEXT,
    balance INTEGER NOT NULL DEFAULT 0,
    tier TEXT NOT NULL DEFAULT 'Bronze'
);
CREATE TABLE IF NOT EXISTS activity (
    event_id TEXT PRIMARY KEY,
    email TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""


class Loyalty:
    """Business operations, each idempotent by event id: the activity row
    and the change commit in one transaction, so a replayed event changes
    nothing even if the dedupe store forgot it.
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=10)
        connection.row_factory = sqlite3.Row
        return connection

    def create_schema(self) -> None:
        with self._connect() as connection:
            connection.executescript(SCHEMA)

    def apply(
        self,
        event_id: str,
        email: str,
        kind: str,
        detail: str,
        change: str | None = None,
        params: t.Sequence[t.Any] = (),
    ) -> bool:
        """Record an activity and apply its change (an UPDATE of the
        customer, whose email is the last parameter) once; return whether it
        was new.
        """
        connection = self._connect()
        try:
            with connection:
                connection.execute("INSERT OR IGNORE INTO customers (email) VALUES (?)", (email,))
                inserted = connection.execute(
                    "INSERT OR IGNORE INTO activity VALUES (?, ?, ?, ?)",
                    (event_id, email, kind, detail),
                ).rowcount
                if inserted and change is not None:
                    connection.execute(change, (*params, email))
                return bool(inserted)
        finally:
            connection.close()

    def customers(self) -> list[dict[str, t.Any]]:
        connection = self._connect()
        try:
            rows = connection.execute(
                "SELECT c.email, c.name, c.balance, c.tier,"
                " (SELECT group_concat(kind || ': ' || detail, '; ') FROM activity a"
                "  WHERE a.email = c.email) AS activity"
                " FROM customers c ORDER BY c.email"
            ).fetchall()
            return [dict(row) for row in rows]
        finally:
            connection.close()
