"""The event Ploints delivers, and the strict parser that builds it from a
verified body.

The parser only ever sees bytes whose signature has already been checked, but
it still treats them as hostile: a leaked secret or a sender bug must end in a
``400``, never in a ``500`` or in a handler seeing half an event.
"""

from __future__ import annotations

import json
import math
import re
import typing as t
from dataclasses import dataclass
from datetime import UTC
from datetime import datetime
from types import MappingProxyType

from ._errors import InvalidEvent

__all__ = ["EVENT_TYPES", "Event", "InvalidEvent", "check_event_types", "parse_event"]

#: The seven event types the sender documents, in the order it lists them.
EVENT_TYPES: tuple[str, ...] = (
    "points.earned",
    "points.redeemed",
    "customer.created",
    "customer.tier_changed",
    "badge.issued",
    "reward.redeemed",
    "campaign.conversion",
)

#: Longest ``id`` accepted. Ploints ids are short (``evt_a1b2c3``); the bound
#: keeps dedupe keys small in every store.
MAX_ID_LENGTH = 255
#: Longest ``type`` accepted.
MAX_TYPE_LENGTH = 128
#: Deepest nesting of arrays and objects accepted anywhere in the body.
MAX_DEPTH = 32


def check_event_types(event_types: t.Iterable[str]) -> tuple[str, ...]:
    """Return ``event_types`` as a tuple if each is a documented type.

    :raises ValueError: no type, or an unknown one (a typo would otherwise
        leave a handler that never runs).
    """
    event_types = tuple(event_types)
    if not event_types:
        raise ValueError("give at least one event type")
    for event_type in event_types:
        if event_type not in EVENT_TYPES:
            raise ValueError(
                f"unknown event type {event_type!r}; known types: {', '.join(EVENT_TYPES)}"
            )
    return event_types


@dataclass(frozen=True, slots=True)
class Event:
    """One delivery from Ploints, after its signature was verified.

    :param id: the event id, unique per event and repeated on every retry.
    :param type: the event type, one of :data:`EVENT_TYPES` or a type this
        version does not know yet.
    :param timestamp: when Ploints created the event, timezone-aware.
    :param data: the event's payload, as a read-only mapping.
    :param raw: the exact bytes that were signed.
    :param account: the Ploints account the event came from, on an
        endpoint for many accounts (``/webhooks/ploints/<account>``);
        ``None`` on an endpoint for one.

    .. versionchanged:: 0.2
        The ``account`` attribute.
    """

    id: str
    type: str
    timestamp: datetime
    data: t.Mapping[str, t.Any]
    raw: bytes
    account: str | None = None

    def __repr__(self) -> str:
        return f"<Event {self.id!r} {self.type!r}>"


def _reject_duplicate_keys(pairs: list[tuple[str, t.Any]]) -> dict[str, t.Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise InvalidEvent("duplicate key in JSON object")
    return result


def _reject_constant(name: str) -> t.NoReturn:
    raise InvalidEvent(f"{name} is not valid JSON")


def _check_depth(value: t.Any) -> None:
    stack: list[tuple[t.Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidEvent(f"JSON nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            children: t.Iterable[t.Any] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def _parse_float(text: str) -> float:
    value = float(text)
    # "1e999" parses to inf without ever spelling "Infinity".
    if math.isinf(value):
        raise InvalidEvent("number out of range")
    return value


def _get(body: dict[str, t.Any], name: str) -> t.Any:
    if name not in body:
        raise InvalidEvent(f"missing field {name!r}")
    return body[name]


def _string(body: dict[str, t.Any], name: str, max_length: int, plain: bool = False) -> str:
    value = _get(body, name)
    if not isinstance(value, str):
        raise InvalidEvent(f"field {name!r} must be a string")
    if not value:
        raise InvalidEvent(f"field {name!r} must not be empty")
    if len(value) > max_length:
        raise InvalidEvent(f"field {name!r} is longer than {max_length} characters")
    if not plain and _UNSTORABLE.search(value):
        # No store can key on a lone surrogate (it is not UTF-8) or a NUL
        # (PostgreSQL text), and a line break would let a signed id forge a
        # log line: a 400 now, rather than a 503 on every retry.
        raise InvalidEvent(f"field {name!r} holds a control character or a lone surrogate")
    return value


def _object(body: dict[str, t.Any], name: str) -> dict[str, t.Any]:
    value = _get(body, name)
    if not isinstance(value, dict):
        raise InvalidEvent(f"field {name!r} must be an object")
    return value


def _parse_timestamp(value: str) -> datetime:
    if (
        len(value) == 20
        and value[19] == "Z"
        and value[10] == "T"
        and value[4] == value[7] == "-"
        and value[13] == value[16] == ":"
    ):
        # The sender's own form, YYYY-MM-DDTHH:MM:SSZ, which datetime reads as
        # it is (refusing any but ASCII digits around the separators): the
        # pattern below costs more than the parse.
        text = value
    else:
        match = _RFC3339.fullmatch(value)
        if match is None:
            raise InvalidEvent("field 'timestamp' is not an RFC 3339 date and time")
        date, time, fraction, offset = match.groups()
        # datetime takes at most microseconds; a "Z" is UTC.
        zone = "+00:00" if offset in ("Z", "z") else offset or ""
        text = f"{date}T{time}{(fraction or '')[:7]}{zone}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidEvent("field 'timestamp' is not an RFC 3339 date and time") from None
    # Ploints always sends "Z"; a value without an offset is taken as UTC
    # rather than rejected, because a 400 would make the sender drop a real
    # event.
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


# C0 and C1 controls, DEL, lone surrogates, and the Unicode line separators.
_UNSTORABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")
# RFC 3339's date-time (its offset optional, see _parse_timestamp); a space
# may stand for the "T", as the RFC allows.
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})?", re.ASCII
)

# One decoder for every body: ``json.loads`` with hooks builds a new one per
# call. It keeps no state between calls, so threads can share it.
_DECODER = json.JSONDecoder(
    object_pairs_hook=_reject_duplicate_keys,
    parse_constant=_reject_constant,
    parse_float=_parse_float,
)


def parse_event(raw: bytes, account: str | None = None) -> Event:
    """Build an :class:`Event` from a verified body.

    :param raw: the request body, exactly as signed.
    :param account: the account whose secret verified it, on an endpoint
        for many accounts.
    :raises InvalidEvent: the body is not UTF-8 JSON, not an object, uses
        ``NaN`` or ``Infinity``, repeats a key, nests deeper than
        :data:`MAX_DEPTH`, or lacks a well-typed ``id``, ``type``,
        ``timestamp`` or ``data``.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEvent("body is not UTF-8") from None
    try:
        body = _DECODER.decode(text)
    except InvalidEvent:
        raise
    except RecursionError:
        raise InvalidEvent(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except ValueError:
        # JSONDecodeError, and the int-to-str digit limit on huge integers.
        raise InvalidEvent("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidEvent("body is not a JSON object")
    # Each level of nesting needs a bracket, so a body with few brackets (as
    # real events have) cannot be too deep and the walk is skipped.
    if raw.count(b"{") + raw.count(b"[") > MAX_DEPTH:
        _check_depth(body)
    return Event(
        id=_string(body, "id", MAX_ID_LENGTH),
        type=_string(body, "type", MAX_TYPE_LENGTH),
        # Checked by its own format, which allows no control character.
        timestamp=_parse_timestamp(_string(body, "timestamp", 64, plain=True)),
        data=MappingProxyType(_object(body, "data")),
        raw=raw,
        account=account,
    )
