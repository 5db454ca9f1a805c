"""Milliseconds to answer the delivery log's list page (the rows, the chart,
the event types) for each filter, over a table of 100,000 rows, on
PostgreSQL by default; and what the search column and its index cost on
write.

The rows are spread over 7 days, to 50 accounts, of 7 event types: 1 % are
failed, 0.5 % rejected, and 20 events hold the rare customer
``jane.rare@example.com``. Each filter's page is asked ``--repeat`` times
through the app's test client (no HTTP), after one warm-up; the median and
the slowest are printed. Run by hand, not by the tests:

    .venv/bin/python bench/delivery_log_list.py [--url URL] [--rows N] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import uuid

import sqlalchemy as sa
from flask import Flask

from flask_ploints import PlointsWebhooks
from flask_ploints.delivery_log import DeliveryLog
from flask_ploints.delivery_log._table import search_text

TYPES = [
    "points.earned",
    "points.redeemed",
    "customer.created",
    "customer.tier_changed",
    "badge.issued",
    "reward.redeemed",
    "campaign.conversion",
]
DAY = 86400.0


def _rows(count: int, now: float) -> list[dict[str, object]]:
    rng = random.Random(7)
    rare = set(rng.sample(range(count), 20))
    rows: list[dict[str, object]] = []
    for number in range(count):
        at = now - 7 * DAY + 7 * DAY * number / count
        roll = rng.random()
        if roll < 0.005:
            rows.append(
                {
                    "received_at": at,
                    "name": "ploints",
                    "outcome": "rejected",
                    "reason": "invalid signature",
                    "status": 401,
                    "client": "198.51.100.23",
                }
            )
            continue
        outcome = "failed" if roll < 0.015 else "duplicate" if roll < 0.05 else "processed"
        event_id = f"evt_{uuid.UUID(int=rng.getrandbits(128)).hex[:20]}"
        email = "jane.rare@example.com" if number in rare else f"c{number}@example.org"
        event_type = TYPES[number % len(TYPES)]
        body = {
            "id": event_id,
            "type": event_type,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)),
            "data": {"customerEmail": email, "amount": number % 500, "description": "Purchase"},
        }
        raw = json.dumps(body).encode()
        rows.append(
            {
                "received_at": at,
                "name": "ploints",
                "event_id": event_id,
                "event_type": event_type,
                "outcome": outcome,
                "reason": "RuntimeError: boom" if outcome == "failed" else None,
                "payload": raw,
                "traceback": "Traceback ...\nRuntimeError: boom" if outcome == "failed" else None,
                "duration": 0.003,
                "account": f"m{number % 50}",
                "search": search_text(event_id, raw),
            }
        )
    return rows


def _insert_rate(log: DeliveryLog, rows: list[dict[str, object]], *, search: bool) -> float:
    """Rows per second of single-row INSERTs, as record() makes, with or
    without the search text.
    """
    sample = [dict(row, search=row.get("search") if search else None) for row in rows]
    started = time.perf_counter()
    with log.engine.connect() as connection:
        for row in sample:
            with connection.begin():
                connection.execute(sa.insert(log.table).values(row))
    return len(sample) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=15)
    options = parser.parse_args()

    table = f"bench_deliveries_{uuid.uuid4().hex[:8]}"
    log = DeliveryLog.from_url(options.url, table_name=table, retention=None)
    app = Flask("bench")
    app.config.update(
        SECRET_KEY="bench",
        PLOINTS_WEBHOOK_URL="/webhooks/ploints/<account>",
        PLOINTS_WEBHOOK_SECRET=lambda account: "whsec_bench",
        PLOINTS_DELIVERY_LOG=log,
        PLOINTS_DELIVERY_LOG_ACCESS=lambda: True,
    )
    PlointsWebhooks(app)
    try:
        log.create_table()
        now = time.time()
        rows = _rows(options.rows, now)
        started = time.perf_counter()
        with log.engine.begin() as connection:
            for start in range(0, len(rows), 5000):
                chunk = rows[start : start + 5000]
                # One shape per executemany: every column, None where unset.
                columns = {key for row in chunk for key in row}
                connection.execute(
                    sa.insert(log.table), [{key: row.get(key) for key in columns} for row in chunk]
                )
        print(
            f"{options.rows} rows loaded in {time.perf_counter() - started:.1f} s ({options.url})"
        )
        if log.engine.dialect.name == "postgresql":
            # As autovacuum would have by then: statistics, and the GIN
            # index's pending list merged (a bulk load leaves it long).
            with log.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
                connection.execute(sa.text(f"VACUUM ANALYZE {table}"))

        day = time.strftime("%Y-%m-%d", time.gmtime(now - 3 * DAY))
        hour = time.strftime("%Y-%m-%dT%H:00", time.gmtime(now - 2 * DAY))
        hour_end = time.strftime("%Y-%m-%dT%H:00", time.gmtime(now - 2 * DAY + 3600))
        filters = [
            ("(none)", ""),
            ("outcome=failed", "outcome=failed"),
            ("outcome=rejected", "outcome=rejected"),
            ("type=badge.issued", "type=badge.issued"),
            ("account=m7", "account=m7"),
            ("q=jane.rare@example.com (20 rows)", "q=jane.rare%40example.com"),
            ("q=EXAMPLE.ORG (most rows)", "q=EXAMPLE.ORG"),
            ("q=no-such-text (no row)", "q=no-such-text"),
            ("q=evt_ + an id prefix", "q=" + str(rows[len(rows) // 2].get("event_id", ""))[:12]),
            (f"since={day}&until={day}", f"since={day}&until={day}"),
            ("since..until, one hour", f"since={hour}&until={hour_end}"),
            ("q=jane.rare + since (3 days)", f"q=jane.rare%40example.com&since={day}"),
            ("outcome=failed&account=m7", "outcome=failed&account=m7"),
        ]
        client = app.test_client()
        print(f"{'filter':<40} {'median ms':>10} {'max ms':>8} {'rows':>5}")
        for label, query in filters:
            url = f"/ploints/deliveries?{query}"
            answer = client.get(url)
            assert answer.status_code == 200, (url, answer.status_code)
            shown = answer.get_data(as_text=True).count('<td class="when">')
            times = []
            for _ in range(options.repeat):
                started = time.perf_counter()
                answer = client.get(url)
                times.append((time.perf_counter() - started) * 1000)
                assert answer.status_code == 200
            print(f"{label:<40} {statistics.median(times):>10.1f} {max(times):>8.1f} {shown:>5}")

        sample = rows[:2000]
        for row in sample:
            row["event_id"] = f"{row.get('event_id')}_w"
        with_search = _insert_rate(log, sample, search=True)
        without = _insert_rate(log, sample, search=False)
        print(
            f"single-row INSERTs: {with_search:.0f}/s with the search text, {without:.0f}/s"
            " without (the column and its index, on PostgreSQL the trigram GIN)"
        )
        with log.engine.connect() as connection:
            sizes = (
                connection.execute(
                    sa.text(
                        "SELECT pg_size_pretty(pg_relation_size(:t)),"
                        " pg_size_pretty(pg_relation_size(:i))"
                    ),
                    {"t": table, "i": f"ix_{table}_search"},
                ).one()
                if log.engine.dialect.name == "postgresql"
                else None
            )
        if sizes is not None:
            print(f"table {sizes[0]}, its search index {sizes[1]}")
    finally:
        log.table.drop(log.engine, checkfirst=True)
        log.engine.dispose()


if __name__ == "__main__":
    main()
