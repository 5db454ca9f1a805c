"""Every code sample in the docs is a file in docs/examples/, included by
the pages with ``literalinclude``; this module runs each of them.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import shutil
import sys
import types
import typing as t
import uuid
import warnings
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from flask import Flask

from flask_ploints import Account
from flask_ploints import PlointsWarning
from flask_ploints import signals
from flask_ploints._signature import sign
from flask_ploints.testing import PlointsClient
from flask_ploints.testing import StoreContract
from flask_ploints.testing import build_event

EXAMPLES = Path(__file__).parent.parent / "docs" / "examples"


@pytest.fixture(scope="module")
def examples() -> t.Iterator[t.Callable[[str], types.ModuleType]]:
    sys.path.insert(0, str(EXAMPLES))
    loaded: list[str] = []

    def load(name: str) -> types.ModuleType:
        loaded.append(name)
        # The examples run outside testing, so the memory store warns as the
        # docs say it does.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(name)
        assert all(issubclass(w.category, PlointsWarning) for w in caught)
        return module

    yield load
    sys.path.remove(str(EXAMPLES))
    for name in loaded:
        sys.modules.pop(name, None)


def _client(app: Flask, name: str = "ploints") -> PlointsClient:
    app.testing = True
    return PlointsClient(app, name)


def test_quickstart(examples: t.Callable[[str], types.ModuleType]) -> None:
    quickstart = examples("quickstart")
    data = {"customerEmail": "jane@example.com", "amount": 50, "newBalance": 350}
    assert _client(quickstart.app).send("points.earned", data).status_code == 200
    assert quickstart.balances == {"jane@example.com": 350}


def test_factory(
    examples: t.Callable[[str], types.ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    factory = examples("factory")
    monkeypatch.setenv("FLASK_PLOINTS_WEBHOOK_SECRET", "whsec_from_env")
    app = factory.create_app({"TESTING": True})
    client = _client(app)
    assert client.secret == "whsec_from_env"
    client.send("customer.created", {"customerEmail": "sam@example.com"})
    assert factory.welcomed == ["sam@example.com"]


def test_two_accounts(examples: t.Callable[[str], types.ModuleType]) -> None:
    two = examples("two_accounts")
    _client(two.app).send("points.earned", id="evt_1")
    _client(two.app, "partner").send("points.earned", id="evt_2")
    assert two.seen == ["main evt_1", "partner evt_2"]


def test_signals(examples: t.Callable[[str], types.ModuleType], restore_signals: None) -> None:
    module = examples("signals_example")
    client = _client(module.app)
    client.send("customer.tier_changed", id="evt_1")
    client.send("reward.redeemed", id="evt_2")
    client.send("reward.redeemed", id="evt_2")
    assert module.log == ["tier Gold", "reward Free coffee via ploints", "duplicate evt_2"]


def test_ordering(examples: t.Callable[[str], types.ModuleType]) -> None:
    ordering = examples("ordering")
    client = _client(ordering.app)
    now = datetime.now(UTC).replace(microsecond=0)
    data = {"customerEmail": "jane@example.com", "previousTier": "Bronze"}
    gold = client.send("customer.tier_changed", {**data, "newTier": "Gold"}, timestamp=now)
    late = now - timedelta(hours=2)
    silver = client.send("customer.tier_changed", {**data, "newTier": "Silver"}, timestamp=late)
    assert (gold.status_code, silver.status_code) == (200, 200)
    assert ordering.tiers == {"jane@example.com": "Gold"}


def test_typed(examples: t.Callable[[str], types.ModuleType]) -> None:
    typed = examples("typed")
    client = _client(typed.app)
    client.send("points.earned")
    client.send("badge.issued")
    assert typed.balances == {"jane@example.com": 350}
    assert typed.badges == {"jane@example.com": "Early Bird"}
    assert client.send("badge.issued", {"badge": "Gold"}).status_code == 500


def test_custom_store_passes_the_contract(pytester: pytest.Pytester) -> None:
    for name in ("custom_store.py", "test_custom_store.py"):
        shutil.copy(EXAMPLES / name, pytester.path / name)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=len([n for n in dir(StoreContract) if n.startswith("test_")]))


def test_testing_example_runs(pytester: pytest.Pytester) -> None:
    for name in ("quickstart.py", "conftest.py", "test_handlers.py"):
        shutil.copy(EXAMPLES / name, pytester.path / name)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore::UserWarning")
    result.assert_outcomes(passed=3)


def test_behind_proxy(examples: t.Callable[[str], types.ModuleType], redis_url: str) -> None:
    module = examples("behind_proxy")
    client = _client(module.app)
    body = json.dumps(build_event("points.earned")).encode()
    headers = {"Content-Type": "application/json", "X-Ploints-Signature": sign(body, client.secret)}
    plain = client.client.post(client.url, data=body, headers=headers)
    assert plain.status_code == 403
    forwarded = client.client.post(
        client.url, data=body, headers={**headers, "X-Forwarded-Proto": "https"}
    )
    assert forwarded.status_code == 200
    _forget(module.app.extensions["ploints"]["ploints"].store, [json.loads(body)["id"]])


@pytest.mark.parametrize("store", ["redis", "postgres"])
def test_production_factory(
    examples: t.Callable[[str], types.ModuleType],
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    store: str,
) -> None:
    url = request.getfixturevalue(f"{store}_url")
    monkeypatch.setenv("PLOINTS_WEBHOOK_SECRET", "whsec_new,whsec_old")
    monkeypatch.setenv("PLOINTS_DEDUPE_STORE", url)
    app = examples("production").create_app()
    client = _client(app)
    ids = [f"evt_docs_{uuid.uuid4().hex}" for _ in range(2)]
    assert client.send("points.earned", id=ids[0]).status_code == 200
    assert client.send("points.earned", id=ids[0]).get_json() == {
        "received": True,
        "duplicate": True,
    }
    client.secret = "whsec_old"
    assert client.send("points.earned", id=ids[1]).status_code == 200
    _forget(app.extensions["ploints"]["ploints"].store, ids)


def _forget(store: t.Any, ids: list[str]) -> None:
    if hasattr(store, "client"):
        store.client.delete(*(store.key(event_id) for event_id in ids))
        store.client.close()
    else:
        with store.engine.begin() as connection:
            connection.execute(store.table.delete().where(store.table.c.id.in_(ids)))
        store.engine.dispose()


def _signed_post(client: PlointsClient, account: str, secret: str, event_id: str) -> int:
    body = json.dumps(build_event("points.earned", id=event_id)).encode()
    headers = {"Content-Type": "application/json", "X-Ploints-Signature": sign(body, secret)}
    return client.client.post(
        f"/webhooks/ploints/{account}", data=body, headers=headers
    ).status_code


def test_merchants(examples: t.Callable[[str], types.ModuleType]) -> None:
    merchants = examples("merchants")
    client = _client(merchants.app)
    data = {"customerEmail": "jane@example.com", "amount": 5, "newBalance": 105}
    assert client.send("points.earned", data, id="evt_1", account="acme").status_code == 200
    assert merchants.balances == {("acme", "jane@example.com"): 105}
    # Rotating acme's secret: both are accepted for acme, neither for globex.
    merchants.start_rotation("acme", "whsec_acme_2")
    assert _signed_post(client, "acme", "whsec_acme_1", "evt_2") == 200
    assert _signed_post(client, "acme", "whsec_acme_2", "evt_3") == 200
    assert _signed_post(client, "globex", "whsec_acme_2", "evt_4") == 401
    assert _signed_post(client, "globex", "whsec_globex_1", "evt_5") == 200
    merchants.finish_rotation("acme")
    assert merchants.SECRETS["acme"] == ["whsec_acme_2"]
    assert _signed_post(client, "acme", "whsec_acme_1", "evt_6") == 401
    assert _signed_post(client, "acme", "whsec_acme_2", "evt_7") == 200
    assert _signed_post(client, "initech", "whsec_acme_2", "evt_8") == 401
    # Another spelling of acme is acme: the event it already ran is a duplicate.
    again = client.send("points.earned", id="evt_7", account="ACME")
    assert again.get_json() == {"received": True, "duplicate": True}


def test_cached_lookup(
    examples: t.Callable[[str], types.ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    cached_lookup = examples("cached_lookup")
    calls: list[str] = []
    table = {"acme": ["whsec_acme_1"]}

    def lookup(account: str) -> Account | None:
        calls.append(account)
        slug = account.casefold()
        return Account(slug, table[slug]) if slug in table else None

    now = [1000.0]
    monkeypatch.setattr(cached_lookup.time, "monotonic", lambda: now[0])
    cached = cached_lookup.cached_for(60)(lookup)
    acme = Account("acme", ["whsec_acme_1"])
    assert [cached("acme"), cached("acme"), cached("globex"), cached("globex")] == [
        acme,
        acme,
        None,
        None,
    ]
    assert calls == ["acme", "globex"]
    # An unknown name is kept 5 seconds, an account under its name 60.
    now[0] += 5
    assert (cached("globex"), cached("acme")) == (None, acme)
    assert calls == ["acme", "globex", "globex"]
    now[0] += 55
    table["acme"] = ["whsec_acme_2", "whsec_acme_1"]
    assert cached("acme") == Account("acme", ["whsec_acme_2", "whsec_acme_1"])
    assert calls == ["acme", "globex", "globex", "acme"]
    cached.cache_clear()
    cached("acme")
    assert calls == ["acme", "globex", "globex", "acme", "acme"]
    # A flood of made-up names, and of other spellings of acme, does not
    # push acme out: they have a small cache of their own.
    del calls[:]
    for number in range(20_001):
        assert cached(f"forged{number}") is None
    for spelling in ("ACME", "Acme", "aCME"):
        assert cached(spelling) == Account("acme", ["whsec_acme_2", "whsec_acme_1"])
    assert cached("acme") == Account("acme", ["whsec_acme_2", "whsec_acme_1"])
    assert len(calls) == 20_004
    assert "acme" not in calls

    loads: list[int] = []

    def load() -> dict[str, list[str]]:
        loads.append(1)
        return dict(table)

    in_memory = cached_lookup.SecretsInMemory(load)
    assert (in_memory("acme"), in_memory("globex"), len(loads)) == (
        Account("acme", table["acme"]),
        None,
        1,
    )
    table["globex"] = ["whsec_globex_1"]
    assert in_memory("globex") is None
    in_memory.refresh()
    assert (in_memory("globex"), len(loads)) == (Account("globex", ["whsec_globex_1"]), 2)


def test_merchants_testing_example_runs(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # This checkout's package, not whichever one is installed.
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES.parent.parent))
    for name in ("merchants.py", "test_merchants.py"):
        shutil.copy(EXAMPLES / name, pytester.path / name)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """The environment the transaction examples read; their database is an
    SQLite file of the test's own.
    """
    url = f"sqlite:///{tmp_path / 'app.db'}"
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("PLOINTS_WEBHOOK_SECRET", SECRET)
    return url


SECRET = "whsec_docs"
DUPLICATE = {"received": True, "duplicate": True}


def test_transactions_exactly_once_with_flask_sqlalchemy(
    examples: t.Callable[[str], types.ModuleType], environ: str
) -> None:
    module = examples("transactions")
    app = module.app
    with app.app_context():
        module.db.create_all()
    client = _client(app)
    data = {"customerEmail": "jane@example.com", "amount": 5}

    def broken(sender: Flask, **extra: t.Any) -> None:
        raise RuntimeError("a later handler failed")

    assert client.send("points.earned", data, id="evt_1").get_json() == {"received": True}
    assert client.send("points.earned", data, id="evt_1").get_json() == DUPLICATE
    with signals.points_earned.connected_to(broken, sender=app):
        assert client.send("points.earned", data, id="evt_2").status_code == 500
    # The failed event's credit was rolled back, and its receipt never sent.
    with app.app_context():
        assert module.db.session.get(module.Account, "jane@example.com").points == 5
        assert sa.inspect(module.db.engine).has_table("ploints_events")
    assert module.receipts == ["jane@example.com +5"]
    assert client.send("points.earned", data, id="evt_2").get_json() == {"received": True}
    with app.app_context():
        assert module.db.session.get(module.Account, "jane@example.com").points == 10
        module.db.engine.dispose()
    assert module.receipts == ["jane@example.com +5", "jane@example.com +5"]


def _ledger(engine: sa.Engine, table: sa.Table) -> list[tuple[str, int]]:
    with engine.connect() as connection:
        rows = connection.execute(sa.select(table.c.email, table.c.amount).order_by(table.c.id))
        return [(email, amount) for email, amount in rows]


def test_transactions_app_factory(
    examples: t.Callable[[str], types.ModuleType], environ: str
) -> None:
    module = examples("transactions_factory")
    app = module.create_app(
        {"SQLALCHEMY_DATABASE_URI": environ, "PLOINTS_WEBHOOK_SECRET": SECRET, "TESTING": True}
    )
    with app.app_context():
        module.db.create_all()
    client = _client(app)
    assert client.send("points.earned", id="evt_1").status_code == 200
    assert client.send("points.redeemed", id="evt_2").status_code == 200
    assert client.send("points.earned", id="evt_1").get_json() == DUPLICATE
    with app.app_context():
        engine = module.db.engine
        assert _ledger(engine, module.ledger) == [
            ("jane@example.com", 50),
            ("jane@example.com", -20),
        ]
        engine.dispose()


@pytest.mark.parametrize("name", ["transactions_sessionmaker", "transactions_scoped"])
def test_transactions_without_flask_sqlalchemy(
    examples: t.Callable[[str], types.ModuleType], environ: str, name: str
) -> None:
    module = examples(name)
    module.metadata.create_all(module.engine)
    client = _client(module.app)
    assert client.send("points.earned", id="evt_1").get_json() == {"received": True}
    assert client.send("points.earned", id="evt_1").get_json() == DUPLICATE
    assert _ledger(module.engine, module.ledger) == [("jane@example.com", 5)]
    module.engine.dispose()


#: A test named in the docs, ``tests/test_x.py::test_name``, and a test file.
_CITED = re.compile(r"\btests/(test_\w+)\.py::(\w+)")
_FILE = re.compile(r"\btests/(test_\w+)\.py\b")
DOCS = [*sorted(EXAMPLES.parent.glob("*.rst")), EXAMPLES.parent.parent / "README.md"]


def _test_functions(module: str) -> set[str]:
    path = Path(__file__).parent / f"{module}.py"
    if not path.exists():
        return set()
    tree = ast.parse(path.read_text(), str(path))
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_the_guarantees_page_names_its_tests() -> None:
    page = (EXAMPLES.parent / "guarantees.rst").read_text()
    cited = {match.groups() for match in _CITED.finditer(page)}
    assert len(cited) >= 30
    assert {module for module, _ in cited} >= {"test_store_session", "test_faults", "test_celery"}


def test_every_test_the_docs_cite_exists() -> None:
    """The Guarantees page backs each claim with a named test; a renamed or
    removed test, or a moved file, must not leave a page pointing at nothing.
    """
    cited = {match.groups() for page in DOCS for match in _CITED.finditer(page.read_text())}
    files = {module for page in DOCS for module in _FILE.findall(page.read_text())}
    defined = {module: _test_functions(module) for module in files}
    missing = sorted(
        f"tests/{module}.py::{name}" for module, name in cited if name not in defined[module]
    )
    missing += sorted(f"tests/{module}.py" for module in files if not defined[module])
    assert missing == [], "the docs name tests that do not exist:\n" + "\n".join(missing)


def _matrix_table() -> dict[tuple[str, str], dict[str, str]]:
    """The guarantee matrix's table on the Guarantees page: for each (store,
    dispatch) row, each promise's cell.
    """
    page = (EXAMPLES.parent / "guarantees.rst").read_text()
    section = page.split("\nThe guarantee matrix\n", 1)[1]
    table = section.split(".. list-table::", 1)[1].split("\n\n", 2)[1]
    rows: list[list[str]] = []
    for line in table.splitlines():
        if line.startswith("   * - "):
            rows.append([line.removeprefix("   * - ")])
        elif line.startswith("     - "):
            rows[-1].append(line.removeprefix("     - "))
    header, *body = rows
    return {
        (store.strip("`"), dispatch): dict(zip(header[2:], cells, strict=True))
        for store, dispatch, *cells in body
    }


def test_the_guarantee_matrix_table_lists_the_cells_the_test_runs() -> None:
    """Each (store, dispatch, promise) of the table names the account modes
    that ``tests/test_matrix.py`` runs it with, no more and no fewer.
    """
    from .matrix_support import ACCOUNTS
    from .matrix_support import PROMISES
    from .matrix_support import cells

    every = [accounts.name for accounts in ACCOUNTS]
    runs: dict[tuple[str, str], dict[str, str]] = {}
    for promise in PROMISES:
        for cell in cells(promise):
            runs.setdefault((cell.store.name, cell.dispatch), dict.fromkeys(PROMISES, ""))
    for key, row in runs.items():
        for promise in PROMISES:
            names = [
                cell.accounts.name
                for cell in cells(promise)
                if (cell.store.name, cell.dispatch) == key
            ]
            row[promise] = "all" if names == every else ", ".join(names) or "—"
    assert _matrix_table() == runs


README = EXAMPLES.parent.parent / "README.md"
#: A markdown link or image target: ``[text](target)``.
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_is_for_users() -> None:
    """The README is the package index's description: short, its install
    before the contributors' commands, and no link that breaks off the
    repository.
    """
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    relative = [target for target in _LINK.findall(text) if not target.startswith("https://")]
    assert relative == []
    assert text.index("pip install flask-ploints") < text.index("./scripts/test")
    for block in re.findall(r"```python\n(.*?)```", text, re.DOTALL):
        ast.parse(block)


def test_the_benchmarks_page_names_benches_that_exist() -> None:
    page = (EXAMPLES.parent / "benchmarks.rst").read_text()
    named = set(re.findall(r"\bbench/(\w+\.py)\b", page))
    assert len(named) >= 6
    bench = EXAMPLES.parent.parent / "bench"
    assert sorted(name for name in named if not (bench / name).exists()) == []
