import secrets
import sqlite3
import threading
import time

from flask_ploints.stores import Claim
from flask_ploints.stores import ClaimStatus


class SQLiteStore:
    """A dedupe store in one SQLite file, written by hand."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS claims (id TEXT PRIMARY KEY, status TEXT, token TEXT, until REAL)"
        )
        self._lock = threading.Lock()

    def claim(self, event_id: str, lease: float, payload: bytes | None = None) -> Claim:
        with self._lock:
            now = time.time()
            row = self._db.execute(
                "SELECT status, until FROM claims WHERE id = ?", (event_id,)
            ).fetchone()
            if row is not None and row[1] > now and row[0] in ("done", "in_flight"):
                if row[0] == "done":
                    return Claim(ClaimStatus.DONE)
                return Claim(ClaimStatus.IN_FLIGHT, retry_after=row[1] - now)
            token = secrets.token_hex(8)
            self._db.execute(
                "INSERT OR REPLACE INTO claims VALUES (?, 'in_flight', ?, ?)",
                (event_id, token, now + lease),
            )
            return Claim(ClaimStatus.CLAIMED, token)

    def _settle(self, event_id: str, token: str, status: str | None, seconds: float) -> bool:
        with self._lock:
            owner = "id = ? AND token = ? AND status = 'in_flight' AND until > ?"
            now = time.time()
            if status is None:
                cursor = self._db.execute(
                    f"DELETE FROM claims WHERE {owner}", (event_id, token, now)
                )
            else:
                cursor = self._db.execute(
                    f"UPDATE claims SET status = ?, until = ? WHERE {owner}",
                    (status, now + seconds, event_id, token, now),
                )
            return cursor.rowcount == 1

    def commit(self, event_id: str, token: str, retention: float) -> bool:
        return self._settle(event_id, token, "done", retention)

    def release(self, event_id: str, token: str) -> bool:
        return self._settle(event_id, token, None, 0)

    def extend(self, event_id: str, token: str, lease: float) -> bool:
        return self._settle(event_id, token, "in_flight", lease)

    def fail(
        self, event_id: str, token: str, error: str, retention: float, attempts: int | None = None
    ) -> bool:
        return self._settle(event_id, token, "failed", retention)
