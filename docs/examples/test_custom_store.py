from pathlib import Path

import pytest
from custom_store import SQLiteStore

from flask_ploints.testing import StoreContract


class TestSQLiteStore(StoreContract):
    @pytest.fixture
    def store(self, tmp_path: Path) -> SQLiteStore:
        return SQLiteStore(str(tmp_path / "claims.sqlite3"))
