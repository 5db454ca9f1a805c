"""Signed bodies that are not valid events: each one a 400 with a clear
reason, never a 500, and no handler runs.
"""

from __future__ import annotations

import json
from datetime import UTC
from datetime import datetime
from types import MappingProxyType

import pytest
from flask import Flask

from flask_ploints import EVENT_TYPES
from flask_ploints import Event
from flask_ploints._events import InvalidEvent
from flask_ploints._events import parse_event
from flask_ploints.testing import PlointsClient

VALID = {"id": "evt_1", "type": "points.earned", "timestamp": "2025-06-15T10:30:00Z", "data": {}}


def _with(**changes: object) -> bytes:
    body = {**VALID, **changes}
    return json.dumps({key: value for key, value in body.items() if value is not _DROP}).encode()


_DROP = object()

_NOT_RFC3339 = "field 'timestamp' is not an RFC 3339 date and time"
_CONTROL = "field %r holds a control character or a lone surrogate"

BAD_BODIES: dict[str, tuple[bytes, str]] = {
    "not_utf8": (b'{"id": "\xff"}', "body is not UTF-8"),
    "utf16": ('{"id": "evt_1"}'.encode("utf-16"), "body is not UTF-8"),
    "not_json": (b"id=evt_1&type=points.earned", "body is not valid JSON"),
    "empty": (b"", "body is not valid JSON"),
    "truncated": (_with()[:-1], "body is not valid JSON"),
    "trailing_garbage": (_with() + b"x", "body is not valid JSON"),
    "array": (b"[1, 2]", "body is not a JSON object"),
    "string": (b'"evt_1"', "body is not a JSON object"),
    "null": (b"null", "body is not a JSON object"),
    "nan": (_with(data={}).replace(b"{}", b'{"amount": NaN}'), "NaN is not valid JSON"),
    "infinity": (_with().replace(b"{}", b'{"amount": Infinity}'), "Infinity is not valid JSON"),
    "minus_infinity": (
        _with().replace(b"{}", b'{"amount": -Infinity}'),
        "-Infinity is not valid JSON",
    ),
    "overflowing_float": (_with().replace(b"{}", b'{"amount": 1e999}'), "number out of range"),
    "huge_integer": (
        _with().replace(b"{}", b'{"amount": ' + b"9" * 5000 + b"}"),
        "body is not valid JSON",
    ),
    "duplicate_key": (
        b'{"id": "evt_1", "id": "evt_2", "type": "points.earned", "timestamp": "2025-06-15T10:30:00Z", "data": {}}',
        "duplicate key in JSON object",
    ),
    "duplicate_key_in_data": (
        _with().replace(b"{}", b'{"amount": 1, "amount": 2}'),
        "duplicate key in JSON object",
    ),
    "missing_id": (_with(id=_DROP), "missing field 'id'"),
    "missing_type": (_with(type=_DROP), "missing field 'type'"),
    "missing_timestamp": (_with(timestamp=_DROP), "missing field 'timestamp'"),
    "missing_data": (_with(data=_DROP), "missing field 'data'"),
    "id_not_string": (_with(id=123), "field 'id' must be a string"),
    "id_empty": (_with(id=""), "field 'id' must not be empty"),
    "id_too_long": (_with(id="e" * 256), "field 'id' is longer than 255 characters"),
    "type_not_string": (_with(type=["points.earned"]), "field 'type' must be a string"),
    "type_too_long": (_with(type="t" * 129), "field 'type' is longer than 128 characters"),
    "timestamp_number": (_with(timestamp=1718447400), "field 'timestamp' must be a string"),
    "timestamp_garbage": (_with(timestamp="yesterday"), _NOT_RFC3339),
    "timestamp_impossible": (_with(timestamp="2025-02-30T10:00:00Z"), _NOT_RFC3339),
    "timestamp_date_only": (_with(timestamp="2025-06-15"), _NOT_RFC3339),
    "timestamp_week_date": (_with(timestamp="2025-W24-7T10:30:00Z"), _NOT_RFC3339),
    "timestamp_basic_format": (_with(timestamp="20250615T103000Z"), _NOT_RFC3339),
    "timestamp_no_seconds": (_with(timestamp="2025-06-15T10:30Z"), _NOT_RFC3339),
    "timestamp_trailing_newline": (
        _with(timestamp="2025-06-15T10:30:00Z\n"),
        _NOT_RFC3339,
    ),
    "timestamp_trailing_nul": (_with(timestamp="2025-06-15T10:30:00Z\x00"), _NOT_RFC3339),
    "timestamp_wide_digits": (_with(timestamp="\uff12025-06-15T10:30:00Z"), _NOT_RFC3339),
    "id_lone_surrogate": (
        _with().replace(b'"evt_1"', b'"evt_\\ud800"'),
        _CONTROL % "id",
    ),
    "type_lone_surrogate": (
        _with().replace(b'"points.earned"', b'"points.\\udfff"'),
        _CONTROL % "type",
    ),
    "id_nul": (_with(id="evt\x001"), _CONTROL % "id"),
    "id_newline": (_with(id="evt_1\nINFO forged line"), _CONTROL % "id"),
    "id_c1_control": (_with(id="evt_\x85"), _CONTROL % "id"),
    "id_line_separator": (_with(id="evt_\u2028"), _CONTROL % "id"),
    "type_tab": (_with(type="points.\tearned"), _CONTROL % "type"),
    "data_null": (_with(data=None), "field 'data' must be an object"),
    "data_list": (_with(data=[1]), "field 'data' must be an object"),
    "data_bool": (_with(data=True), "field 'data' must be an object"),
    "nested_too_deep": (
        _with().replace(b"{}", b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}"),
        "JSON nested deeper than 32 levels",
    ),
    "nested_absurdly_deep": (
        _with().replace(b"{}", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "JSON nested deeper than 32 levels",
    ),
}


@pytest.mark.parametrize("body, reason", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_parse_event_rejects(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        parse_event(body)
    assert str(info.value) == reason


@pytest.mark.parametrize("body, reason", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_400_signed_but_invalid(
    app: Flask, calls: list[tuple[str, str]], body: bytes, reason: str
) -> None:
    response = PlointsClient(app).post(body)
    assert response.status_code == 400
    assert response.get_json() == {"error": reason}
    assert calls == []


def test_parse_event_builds_an_immutable_event() -> None:
    raw = _with(data={"customerEmail": "jane@example.com", "amount": 50})
    event = parse_event(raw)
    assert event == Event(
        id="evt_1",
        type="points.earned",
        timestamp=datetime(2025, 6, 15, 10, 30, tzinfo=UTC),
        data=MappingProxyType({"customerEmail": "jane@example.com", "amount": 50}),
        raw=raw,
    )
    assert isinstance(event.data, MappingProxyType)
    with pytest.raises(TypeError):
        event.data["amount"] = 1  # type: ignore[index]
    with pytest.raises(AttributeError):
        event.id = "evt_2"  # type: ignore[misc]


@pytest.mark.parametrize(
    "timestamp, expected",
    [
        ("2025-06-15T10:30:00Z", datetime(2025, 6, 15, 10, 30, tzinfo=UTC)),
        ("2025-06-15t10:30:00z", datetime(2025, 6, 15, 10, 30, tzinfo=UTC)),
        ("2025-06-15 10:30:00+00:00", datetime(2025, 6, 15, 10, 30, tzinfo=UTC)),
        ("2025-06-15T10:30:00.123456789Z", datetime(2025, 6, 15, 10, 30, 0, 123456, tzinfo=UTC)),
    ],
)
def test_rfc3339_forms_are_accepted(timestamp: str, expected: datetime) -> None:
    assert parse_event(_with(timestamp=timestamp)).timestamp == expected


def test_ids_beyond_ascii_are_accepted() -> None:
    assert parse_event(_with(id="évènement-1 🎉")).id == "évènement-1 🎉"


def test_timestamp_offsets_are_kept_and_naive_means_utc() -> None:
    assert parse_event(_with(timestamp="2025-06-15T12:30:00+02:00")).timestamp == datetime(
        2025, 6, 15, 10, 30, tzinfo=UTC
    )
    assert parse_event(_with(timestamp="2025-06-15T10:30:00")).timestamp.tzinfo is UTC
    assert (
        parse_event(_with(timestamp="2025-06-15T10:30:00.123456Z")).timestamp.microsecond == 123456
    )


def test_unknown_top_level_fields_are_tolerated() -> None:
    assert parse_event(_with(apiVersion="2026-01")).id == "evt_1"


def test_event_types_are_the_documented_seven_in_order() -> None:
    assert EVENT_TYPES == (
        "points.earned",
        "points.redeemed",
        "customer.created",
        "customer.tier_changed",
        "badge.issued",
        "reward.redeemed",
        "campaign.conversion",
    )
