"""``flask_ploints.after_commit``: a call a handler leaves for after the
event is committed, with the SessionStore (on SQLite, a file) and with the
memory store, through the real endpoint.
"""

from __future__ import annotations

import logging
import typing as t
from pathlib import Path

import pytest

from flask_ploints import Event
from flask_ploints import after_commit
from flask_ploints.stores import EventState

from .session_app import DUPLICATE
from .session_app import PROCESSED
from .session_app import Shop
from .session_app import body


@pytest.fixture(params=["session", "memory"])
def store(request: pytest.FixtureRequest) -> str:
    """The dedupe store: the app's ``db``, or the memory store."""
    name: str = request.param
    return name


@pytest.fixture
def shop(tmp_path: Path, unique: str) -> t.Iterator[Shop]:
    shop = Shop(f"sqlite:///{tmp_path / 'app.db'}", unique)
    yield shop
    shop.close()


def test_after_commit_runs_once_after_commit(tmp_path: Path, unique: str, store: str) -> None:
    config: dict[str, t.Any] = {} if store == "session" else {"PLOINTS_DEDUPE_STORE": "memory"}
    shop = Shop(f"sqlite:///{tmp_path / 'app.db'}", unique, **config)
    # What each call saw: the event's state in the dedupe store, and the
    # awards committed (the memory store commits none of the handler's).
    seen: list[tuple[str, EventState | None, list[str]]] = []

    def email(event_id: str) -> None:
        stored = shop.stored(event_id)
        seen.append((event_id, None if stored is None else stored.status, shop.rows()))

    shop.then = lambda event: after_commit(email, event.id)
    try:
        response = shop.sender.post(body("evt_1"))
        assert (response.status_code, response.get_json()) == (200, PROCESSED)
        committed = ["evt_1"] if store == "session" else []
        assert seen == [("evt_1", EventState.DONE, committed)]
        assert shop.sender.post(body("evt_1")).get_json() == DUPLICATE
        assert seen == [("evt_1", EventState.DONE, committed)]
    finally:
        shop.close()


def test_after_commit_skipped_when_the_handler_fails(shop: Shop) -> None:
    calls: list[str] = []
    shop.then = lambda event: after_commit(calls.append, event.id)
    shop.mode = "raise"
    assert shop.sender.post(body("evt_1")).status_code == 500
    shop.mode = "commit"
    assert shop.sender.post(body("evt_2")).status_code == 500
    assert calls == []
    shop.mode = "ok"
    assert shop.sender.post(body("evt_1")).get_json() == PROCESSED
    assert calls == ["evt_1"]


def test_after_commit_outside_a_handler_raises(shop: Shop) -> None:
    message = r"^after_commit\(\) works only inside the handlers of an event$"
    with pytest.raises(RuntimeError, match=message):
        after_commit(print, "never")
    shop.then = lambda event: after_commit(print, event.id)
    assert shop.sender.post(body("evt_1")).get_json() == PROCESSED
    # Collecting ended with the event: this thread is outside a handler again.
    with pytest.raises(RuntimeError, match=message):
        after_commit(print, "never")


def test_after_commit_error_is_logged(shop: Shop, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def broken(event_id: str) -> None:
        raise RuntimeError(f"mail server down for {event_id}")

    def register(event: Event) -> None:
        after_commit(broken, event.id)
        after_commit(calls.append, event.id)

    shop.then = register
    with caplog.at_level(logging.ERROR, logger="flask_ploints"):
        assert shop.sender.post(body("evt_1")).get_json() == PROCESSED
    (record,) = caplog.records
    assert record.getMessage() == "event 'evt_1': an after_commit call raised"
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "mail server down for evt_1"
    # The call after the one that raised still ran; the event stays done.
    assert calls == ["evt_1"]
    stored = shop.stored("evt_1")
    assert stored is not None and stored.status is EventState.DONE
    assert shop.rows() == ["evt_1"]


@pytest.mark.parametrize(
    "process_exit", [SystemExit(3), KeyboardInterrupt()], ids=["SystemExit", "KeyboardInterrupt"]
)
def test_after_commit_process_exit_is_logged_and_answered_processed(
    shop: Shop, caplog: pytest.LogCaptureFixture, process_exit: BaseException
) -> None:
    calls: list[str] = []

    def stop() -> None:
        raise process_exit

    def register(event: Event) -> None:
        after_commit(stop)
        after_commit(calls.append, event.id)

    shop.then = register
    with caplog.at_level(logging.ERROR, logger="flask_ploints"):
        response = shop.sender.post(body("evt_1"))
    # The commit earned the 200: the sender must not retry a done event.
    assert (response.status_code, response.get_json()) == (200, PROCESSED)
    (record,) = caplog.records
    assert record.getMessage() == (
        f"event 'evt_1': an after_commit call raised {type(process_exit).__name__}, not carried out:"
        " the event is committed and answered processed"
    )
    assert record.exc_info is not None and record.exc_info[1] is process_exit
    assert calls == ["evt_1"]
    stored = shop.stored("evt_1")
    assert stored is not None and stored.status is EventState.DONE
    assert shop.sender.post(body("evt_1")).get_json() == DUPLICATE
