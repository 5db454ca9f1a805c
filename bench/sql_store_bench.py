"""Claim+commit pairs per second of :class:`SQLAlchemyStore` in one thread,
against the store of an older revision, in the same run.

The older store is read with ``git show REV:flask_ploints/stores/sql.py`` (a
revision from before the store became a package, 6ffc509 by default) and
imported from a temporary file; both run in alternating rounds on fresh
tables, so drift on the machine hits both alike.

Run: ``.venv/bin/python bench/sql_store_bench.py [--url URL] [--pairs N]
[--rounds N] [--against REV]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import typing as t
import uuid
from pathlib import Path

from flask_ploints.stores._sql import SQLAlchemyStore


def _old_store(rev: str) -> t.Any:
    """The ``SQLAlchemyStore`` class of ``flask_ploints/stores/sql.py`` at ``rev``."""
    source = subprocess.run(
        ["git", "show", f"{rev}:flask_ploints/stores/sql.py"],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    source = source.replace("from .base import", "from flask_ploints.stores._base import")
    path = Path(tempfile.mkdtemp()) / "old_sql_store.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_sql_store", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_sql_store"] = module
    spec.loader.exec_module(module)
    return module.SQLAlchemyStore


def _round(cls: t.Any, url: str, pairs: int) -> float:
    """Seconds for ``pairs`` claim+commit pairs of new ids on a fresh table."""
    table = f"bench_{uuid.uuid4().hex[:10]}"
    store = cls.from_url(url, table_name=table)
    try:
        for number in range(50):  # connect, create the table, compile
            claim = store.claim(f"warm_{number}", 60)
            store.commit(f"warm_{number}", claim.token, 60)
        started = time.perf_counter()
        for number in range(pairs):
            claim = store.claim(f"evt_{number}", 60)
            store.commit(f"evt_{number}", claim.token, 60)
        return time.perf_counter() - started
    finally:
        store.close()
        store.table.drop(store.engine, checkfirst=True)
        store.engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", default="6ffc509")
    args = parser.parse_args()
    stores = {f"old ({args.against})": _old_store(args.against), "new": SQLAlchemyStore}
    times: dict[str, list[float]] = {name: [] for name in stores}
    for _ in range(args.rounds):
        for name, cls in stores.items():
            times[name].append(_round(cls, args.url, args.pairs))
    for name, seconds in times.items():
        best, median = min(seconds), statistics.median(seconds)
        print(
            f"{name:>16}: {args.pairs} pairs, best {best:.3f} s ({args.pairs / best:,.0f}/s),"
            f" median {median:.3f} s ({args.pairs / median:,.0f}/s)"
        )


if __name__ == "__main__":
    main()
