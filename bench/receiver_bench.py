"""Requests per second of the extension against a hand-written receiver, in
one process, without a server.

Both receivers are Flask apps driven through WSGI by the same loop: each
request is a pre-built environ (pre-signed body, fresh ``wsgi.input``) passed
to ``app(environ, start_response)``, and the body iterable is drained and
closed as a WSGI server would. The two run in alternating rounds, each round
on a fresh app and store, so drift on the machine hits both alike.

* hand-written: the sender's Node example, written in Flask: read the raw
  body, ``hmac.new`` + ``hmac.compare_digest`` against the header,
  ``json.loads``, a Python ``set`` to dedupe, a branch on the type, and
  ``jsonify({"received": True})``.
* extension: :class:`~flask_ploints.PlointsWebhooks` with a
  :class:`~flask_ploints.stores.MemoryStore`, ``app.testing = True`` and one
  handler on ``points.earned``.

* many accounts (``--accounts N``): the extension with one endpoint for N
  accounts, ``/webhooks/ploints/<account>`` with a secret lookup that is a
  dict's ``.get``; each delivery goes to one of the N accounts in turn,
  signed with its own secret. Its rate is compared with the extension's
  (single account) in the same rounds.

* latest_by (``--latest-by STORE``): instead of the above, the extension
  with one handler of ``customer.tier_changed`` registered with
  ``latest_by`` the customer's email, against the same handler without it,
  both on ``STORE`` (``memory``, a Redis URL, a database URL, or ``db:``
  and a database URL for ``PLOINTS_DEDUPE_STORE = db`` with
  Flask-SQLAlchemy), each round on fresh keys or tables. The events are tier changes of 500 customers,
  each applied (none stale), so every delivery pays for the guard.

Run: ``.venv/bin/python bench/receiver_bench.py [--events N] [--rounds N]
[--accounts N] [--latest-by STORE] [--clock wall|cpu] [--chunk N]
[--gc-freeze] [--profile]``. With
``--chunk``, each round runs the receivers in turn, N requests at a time,
rather than one after the other: on a machine busy with other work, the
steadier comparison. ``--profile`` runs the extension once more
under cProfile and prints the costliest functions.

``bench/receiver_instructions.py`` counts the same receivers' instructions
per delivery under callgrind: no noise, but no cache misses either.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import hmac
import io
import json
import pstats
import statistics
import sys
import time
import typing as t
import uuid

from flask import Flask
from flask import jsonify
from flask import request
from werkzeug.test import EnvironBuilder

from flask_ploints import Event
from flask_ploints import PlointsWebhooks
from flask_ploints._samples import build_event
from flask_ploints._signature import sign
from flask_ploints.stores import MemoryStore

SECRET = "whsec_bench_secret"
URL = "/webhooks/ploints"
TYPES = ("points.earned", "points.redeemed", "customer.created", "badge.issued")

Environ = dict[str, t.Any]


def hand_written_app() -> Flask:
    """The receiver a developer writes from the sender's Node example."""
    app = Flask("hand_written")
    seen: set[str] = set()
    secret = SECRET.encode()
    earned: list[str] = []

    @app.post(URL)
    def receive() -> t.Any:
        signature = request.headers.get("X-Ploints-Signature", "")
        raw = request.get_data()
        expected = hmac.new(secret, raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(signature, expected):
            return jsonify({"error": "Invalid signature"}), 401
        event = json.loads(raw)
        if event["id"] in seen:
            return jsonify({"received": True})
        if event["type"] == "points.earned":
            earned.append(event["id"])
        elif event["type"] == "customer.created":
            pass
        seen.add(event["id"])
        return jsonify({"received": True})

    return app


def extension_app(name: str = "extension", **config: t.Any) -> Flask:
    """The same receiver with the extension; ``config`` overrides its keys."""
    app = Flask(name)
    app.testing = True
    app.config["PLOINTS_WEBHOOK_SECRET"] = SECRET
    app.config["PLOINTS_DEDUPE_STORE"] = MemoryStore()
    app.config.update(config)
    webhooks = PlointsWebhooks(app)
    earned: list[str] = []

    @webhooks.on("points.earned")
    def award(event: Event) -> None:
        earned.append(event.id)

    return app


def latest_by_app(store: str, ordered: bool, made: list[Flask]) -> t.Callable[[], Flask]:
    """The extension with a tier handler, with ``latest_by`` when
    ``ordered``, on ``store``; each app made is appended to ``made``.
    """

    def factory() -> Flask:
        name = f"bench_{uuid.uuid4().hex[:10]}"
        app = Flask("latest_by" if ordered else "without_latest_by")
        app.testing = True
        app.config.update(
            PLOINTS_WEBHOOK_SECRET=SECRET,
            PLOINTS_DEDUPE_STORE=MemoryStore() if store == "memory" else store,
            PLOINTS_REDIS_PREFIX=f"{name}:",
            PLOINTS_SQL_TABLE=name,
        )
        if store.startswith("db:"):
            # Imported here: only this form needs Flask-SQLAlchemy.
            from flask_sqlalchemy import SQLAlchemy

            db = SQLAlchemy()
            app.config.update(SQLALCHEMY_DATABASE_URI=store[3:], PLOINTS_DEDUPE_STORE=db)
            db.init_app(app)
        webhooks = PlointsWebhooks(app)
        tiers: dict[str, str] = {}
        options: dict[str, t.Any] = {}
        if ordered:
            options = {"latest_by": lambda event: event.data["customerEmail"], "name": "tier"}

        @webhooks.on("customer.tier_changed", **options)
        def tier(event: Event) -> None:
            tiers[event.data["customerEmail"]] = event.data["newTier"]

        made.append(app)
        return app

    return factory


def forget(apps: list[Flask]) -> None:
    """Remove what the stores of ``apps`` kept: Redis keys, SQL tables."""
    for app in apps:
        store = app.extensions["ploints"]["ploints"].store
        prefix = app.config["PLOINTS_REDIS_PREFIX"]
        client = getattr(store, "client", None)
        if client is not None:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
        engine = getattr(store, "engine", None)
        if "sqlalchemy" in app.extensions:
            with app.app_context():
                engine = app.extensions["sqlalchemy"].engine
        elif engine is not None:
            store.close()
        if engine is not None:
            with engine.begin() as connection:
                table_name = app.config["PLOINTS_SQL_TABLE"]
                for table in (table_name, f"{table_name}_order"):
                    connection.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
            engine.dispose()


def account_secrets(count: int) -> dict[str, str]:
    """The secrets of ``count`` accounts, by account."""
    return {f"merchant_{number:05d}": f"whsec_bench_{number:05d}" for number in range(count)}


def many_accounts_app(secrets: dict[str, str]) -> t.Callable[[], Flask]:
    """The extension on one endpoint for the accounts of ``secrets``."""

    def factory() -> Flask:
        return extension_app(
            "many_accounts",
            PLOINTS_WEBHOOK_URL=URL + "/<account>",
            PLOINTS_WEBHOOK_SECRET=secrets.get,
        )

    return factory


def build_environs(
    count: int, secrets: dict[str, str] | None = None, tiers: bool = False
) -> list[tuple[Environ, bytes]]:
    """``count`` distinct signed deliveries, as environ templates and bodies;
    to the accounts of ``secrets`` in turn when given; tier changes of 500
    customers when ``tiers``.
    """
    result = []
    accounts = list(secrets or {})
    for number in range(count):
        event_id = f"evt_bench_{number:08d}"
        if tiers:
            data = {"customerEmail": f"c{number % 500}@example.com", "newTier": f"t{number}"}
            event = build_event("customer.tier_changed", data, id=event_id)
        else:
            event = build_event(TYPES[number % len(TYPES)], id=event_id)
        body = json.dumps(event).encode()
        path, secret = URL, SECRET
        if secrets is not None:
            account = accounts[number % len(accounts)]
            path, secret = f"{URL}/{account}", secrets[account]
        builder = EnvironBuilder(
            path=path,
            method="POST",
            data=body,
            headers=[
                ("Content-Type", "application/json"),
                ("X-Ploints-Signature", sign(body, secret)),
            ],
        )
        environ = builder.get_environ()
        builder.close()
        result.append((environ, body))
    return result


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: t.Any = None) -> t.Any:
    _start_response.status = status  # type: ignore[attr-defined]
    return None


#: What a round is timed with: wall-clock time, or this process's CPU time
#: (``--clock cpu``), which a machine shared with other work disturbs less.
CLOCKS: dict[str, t.Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter
#: ``--gc-freeze``: keep what exists before a round out of the collector's
#: full passes, which otherwise land on whichever receiver runs then.
freeze = False


def run(app: Flask, templates: list[tuple[Environ, bytes]]) -> float:
    """Drive ``app`` with every delivery once; return requests per second."""
    environs = [{**environ, "wsgi.input": io.BytesIO(body)} for environ, body in templates]
    gc.collect()
    if freeze:
        # The deliveries built for the round are not the receivers' garbage.
        gc.freeze()
    started = clock()
    for environ in environs:
        iterable = app(environ, _start_response)
        b"".join(iterable)
        close = getattr(iterable, "close", None)
        if close is not None:
            close()
    elapsed = clock() - started
    status = _start_response.status  # type: ignore[attr-defined]
    if not status.startswith("200"):
        raise SystemExit(f"{app.name} answered {status}")
    return len(environs) / elapsed


def run_interleaved(
    apps: dict[str, tuple[Flask, list[tuple[Environ, bytes]]]], chunk: int
) -> dict[str, float]:
    """Drive every app with its deliveries, ``chunk`` at a time in turn (in
    ABBA order), and return each one's requests per second: a machine busy
    with other work slows each alike, where whole rounds of one app can
    fall into a quiet or a busy spell.
    """
    environs = {
        name: [{**environ, "wsgi.input": io.BytesIO(body)} for environ, body in templates]
        for name, (_, templates) in apps.items()
    }
    spent = dict.fromkeys(apps, 0.0)
    names = list(apps)
    gc.collect()
    if freeze:
        # The deliveries built for the round are not the receivers' garbage.
        gc.freeze()
    for number, start in enumerate(range(0, len(environs[names[0]]), chunk)):
        for name in names if number % 2 == 0 else reversed(names):
            app = apps[name][0]
            begun = clock()
            for environ in environs[name][start : start + chunk]:
                iterable = app(environ, _start_response)
                b"".join(iterable)
                iterable.close()
            spent[name] += clock() - begun
            if not _start_response.status.startswith("200"):  # type: ignore[attr-defined]
                raise SystemExit(f"{app.name} answered {_start_response.status}")  # type: ignore[attr-defined]
    return {name: len(environs[name]) / spent[name] for name in apps}


def profile(templates: list[tuple[Environ, bytes]], limit: int) -> None:
    """Run the extension once under cProfile and print where time goes."""
    app = extension_app()
    profiler = cProfile.Profile()
    profiler.enable()
    run(app, templates)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats("flask_ploints", limit)


def main() -> None:
    """Parse the arguments, run the rounds, print the rates and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--accounts",
        type=int,
        default=0,
        help="Also run the extension on one endpoint for this many accounts.",
    )
    parser.add_argument(
        "--latest-by",
        metavar="STORE",
        help="Compare a handler with latest_by to one without, on STORE: memory, a URL or db:URL.",
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="Time rounds by wall clock or by this process's CPU time.",
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=0,
        help="Run the receivers in turn, this many requests each, within every round.",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() before each timed run, so no receiver pays for the others' garbage.",
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-lines", type=int, default=30)
    args = parser.parse_args()
    global clock, freeze
    clock = CLOCKS[args.clock]
    freeze = args.gc_freeze

    templates = build_environs(args.events)
    receivers: dict[str, t.Callable[[], Flask]] = {
        "hand-written": hand_written_app,
        "extension": extension_app,
    }
    inputs = {"hand-written": templates, "extension": templates}
    made: list[Flask] = []
    if args.latest_by:
        tier_templates = build_environs(args.events, tiers=True)
        receivers = {
            "without": latest_by_app(args.latest_by, False, made),
            "latest_by": latest_by_app(args.latest_by, True, made),
        }
        inputs = {"without": tier_templates, "latest_by": tier_templates}
    if args.accounts > 0:
        secrets = account_secrets(args.accounts)
        receivers["many accounts"] = many_accounts_app(secrets)
        inputs["many accounts"] = build_environs(args.events, secrets)
    rates: dict[str, list[float]] = {name: [] for name in receivers}
    # A warm-up round that is not counted: imports, caches, the allocator.
    for name, factory in receivers.items():
        run(factory(), inputs[name][: min(2000, len(templates))])
    for number in range(args.rounds):
        if args.chunk > 0:
            built = {name: (factory(), inputs[name]) for name, factory in receivers.items()}
            for name, rate in run_interleaved(built, args.chunk).items():
                rates[name].append(rate)
        else:
            # ABBA: every receiver runs first as often as last.
            order = list(receivers) if number % 2 == 0 else list(reversed(receivers))
            for name in order:
                rates[name].append(run(receivers[name](), inputs[name]))
        print(
            f"round {number + 1}: "
            + ", ".join(f"{name} {rates[name][-1]:,.0f} req/s" for name in receivers)
        )

    print(f"\n{args.events:,} distinct signed events per round, {args.rounds} rounds")
    print(f"python {sys.version.split()[0]}, timed by {args.clock} clock")
    for name in receivers:
        print(
            f"{name:>13}: median {statistics.median(rates[name]):,.0f} req/s,"
            f" best {max(rates[name]):,.0f} req/s"
        )
    if args.latest_by:
        forget(made)
        ordered, plain = rates["latest_by"], rates["without"]
        paired = statistics.median(o / p for o, p in zip(ordered, plain, strict=True))
        print(
            f"latest_by / without on {args.latest_by}: "
            f"{statistics.median(ordered) / statistics.median(plain):.3f}x (median),"
            f" {paired:.3f}x (median of the rounds' ratios)"
        )
        return
    median_ratio = statistics.median(rates["extension"]) / statistics.median(rates["hand-written"])
    best_ratio = max(rates["extension"]) / max(rates["hand-written"])
    print(f"extension / hand-written: {median_ratio:.2f}x (median), {best_ratio:.2f}x (best)")
    if args.accounts > 0:
        many, one = rates["many accounts"], rates["extension"]
        paired = statistics.median(m / o for m, o in zip(many, one, strict=True))
        print(
            f"many accounts ({args.accounts}) / extension: "
            f"{statistics.median(many) / statistics.median(one):.3f}x (median),"
            f" {max(many) / max(one):.3f}x (best), {paired:.3f}x (median of the rounds' ratios)"
        )
    if args.profile:
        profile(templates, args.profile_lines)


if __name__ == "__main__":
    main()
