"""The webhook endpoint: check, read, verify and parse a request, hand the
event to the :class:`~flask_ploints._processing.Processor` (claim, dispatch,
settle), and answer for its outcome.

Every request a client can send ends in one of these answers, always JSON:

====  =============================================================
200   processed (``{"received": true}``), or a duplicate of a processed
      event (``"duplicate": true``), or an unknown type seen by ``on_any``
202   handed to a worker (async dispatch)
400   signed, but not a valid event; or a body shorter than its
      ``Content-Length``
401   signature missing, malformed or wrong; or, on an endpoint for many
      accounts, an account the lookup does not know (the same answer, so
      that it does not tell which accounts exist; the body is not read)
403   HTTPS required and the request was plain HTTP
405   not a POST
411   a chunked body the server did not pass on (uWSGI's ``--http-socket``)
409   the same event is being processed right now (``Retry-After``)
413   body over ``PLOINTS_WEBHOOK_MAX_BYTES``
415   Content-Type not JSON
500   a handler raised; the claim is released so the retry runs again
503   the dedupe store or the broker is down, or the secret lookup of an
      endpoint for many accounts failed, or has every slot taken by slow
      calls (``Retry-After``)
====  =============================================================
"""

from __future__ import annotations

import io
import json
import logging
import math
import typing as t
from datetime import UTC
from datetime import datetime
from datetime import timedelta

from flask import Flask
from flask import Request
from flask import Response
from flask import current_app
from flask import request
from werkzeug.exceptions import ClientDisconnected
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.wsgi import get_content_length

from . import signals
from ._accounts import LookupBusy
from ._accounts import account_name
from ._config import Settings
from ._errors import DispatchError
from ._errors import SecretLookupError
from ._events import Event
from ._events import InvalidEvent
from ._events import parse_event
from ._logfields import REJECTED
from ._logfields import delivery_fields
from ._processing import Outcome
from ._processing import Processor
from ._processing import Result
from ._signature import SIGNATURE_HEADER
from ._signature import verify
from .signals import notify

__all__ = ["WebhookEndpoint"]

logger = logging.getLogger("flask_ploints")

#: The fields of a record about a refused delivery, which has no event:
#: logging copies them into each record and never changes the dict.
_REJECTED = delivery_fields(REJECTED)

#: Seconds the sender is asked to wait after a ``503``; its own schedule
#: waits at least a minute anyway.
STORE_RETRY_AFTER = 60
_RETRY_AFTER = str(STORE_RETRY_AFTER)


def _json(status: int, body: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(body, status, headers, mimetype="application/json")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    # The message is always one of ours: never a header, a secret or the body.
    return _json(status, json.dumps({"error": message}).encode() + b"\n", headers)


_PROCESSED = b'{"received": true}\n'
_DUPLICATE = b'{"received": true, "duplicate": true}\n'
_QUEUED = b'{"received": true, "queued": true}\n'


class WebhookEndpoint:
    """The endpoint of one :class:`~flask_ploints.PlointsWebhooks` instance
    on one app; its :meth:`receive` method is the view function. It checks,
    reads, verifies and parses a request, hands the event to the
    :class:`~flask_ploints._processing.Processor`, and answers for the
    outcome.

    A plain object rather than a :class:`flask.views.View`: one instance
    serves every request, and Flask calls the bound method directly.

    :param name: the instance's name, passed to every signal.
    :param settings: the instance's checked settings.
    :param processor: what claims, runs and settles a verified event.
    """

    #: Every method of the HTTP method registry is routed here, so that each
    #: one but POST gets a JSON ``405`` rather than werkzeug's HTML page.
    methods: t.ClassVar[tuple[str, ...]] = (
        *("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "QUERY"),
        *("ACL", "BASELINE-CONTROL", "BIND", "CHECKIN", "CHECKOUT", "COPY", "LABEL", "LINK"),
        *("LOCK", "MERGE", "MKACTIVITY", "MKCALENDAR", "MKCOL", "MKREDIRECTREF", "MKWORKSPACE"),
        *("MOVE", "ORDERPATCH", "PRI", "PROPFIND", "PROPPATCH", "REBIND", "REPORT", "SEARCH"),
        *("UNBIND", "UNCHECKOUT", "UNLINK", "UNLOCK", "UPDATE", "UPDATEREDIRECTREF"),
        "VERSION-CONTROL",
    )

    def __init__(self, name: str, settings: Settings, processor: Processor) -> None:
        self.name = name
        self.settings = settings
        self.processor = processor
        self._keys = tuple(secret.encode("utf-8") for secret in settings.secrets)
        self._accounts = settings.accounts
        # Only a worker's dispatcher signs with the account's current secret
        # (the task's proof); an inline one skips remembering it.
        self._remembered = None if processor.dispatcher.runs_inline else settings.accounts

    def receive(self, account: object = None) -> Response:
        """Answer one delivery; ``account`` from the URL of an endpoint for
        many accounts, as its converter made it.
        """
        # The app itself, not the proxy: signals are sent by the real app.
        app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        req: Request = request._get_current_object()  # type: ignore[attr-defined]
        # None when chunked or absent; read as werkzeug's stream reads it,
        # from the environ (Request.content_length parses two headers).
        length = get_content_length(req.environ)
        rejected = self._check_request(req, length)
        if rejected is not None:
            return rejected
        keys = self._keys
        secrets: tuple[str, ...] = ()
        name: str | None = None
        if self._accounts is not None:
            try:
                found = self._accounts.find(account)
            except LookupBusy:
                name = account_name(account)
                logger.warning(
                    "rejected a delivery: every secret lookup slot is taken",
                    extra=delivery_fields(Outcome.UNAVAILABLE, account=name),
                )
                return _error(503, "secret lookup busy", {"Retry-After": _RETRY_AFTER})
            except SecretLookupError:
                logger.exception(
                    "rejected a delivery: the secret lookup failed",
                    extra=delivery_fields(Outcome.UNAVAILABLE, account=account_name(account)),
                )
                return _error(503, "secret lookup unavailable", {"Retry-After": _RETRY_AFTER})
            if found is None:
                name = account_name(account)
                logger.warning(
                    "rejected a delivery: unknown account %r", name, extra=_rejected(name)
                )
                # What a wrong signature answers: no list of accounts by trial.
                return _error(401, "invalid signature")
            name, secrets, keys = found
        raw = _read_body(req, length, self.settings.max_bytes)
        if raw is None:
            return self._too_large()
        if length is not None and len(raw) < length:
            logger.warning(
                "rejected a delivery: body shorter than its Content-Length",
                extra=_rejected(name),
            )
            return _error(400, "body shorter than Content-Length")

        if not verify(raw, req.headers.get(SIGNATURE_HEADER), keys):
            logger.warning("rejected a delivery: invalid signature", extra=_rejected(name))
            notify(signals.signature_rejected, app, self.name, reason="invalid signature")
            return _error(401, "invalid signature")

        try:
            event = parse_event(raw, name)
            self._check_age(event)
        except InvalidEvent as exc:
            logger.warning("rejected a signed delivery: %s", exc, extra=_rejected(name))
            notify(signals.payload_rejected, app, self.name, reason=str(exc))
            return _error(400, str(exc))
        notify(signals.event_received, app, self.name, event=event)

        if self._remembered is None:
            result = self.processor.deliver(app, event)
        else:
            with self._remembered.verified(event.account or "", secrets, req.path):
                result = self.processor.deliver(app, event)
        return _ANSWERS[result.outcome](result)

    def _check_request(self, req: Request, length: int | None) -> Response | None:
        if req.method != "POST":
            return _error(405, "method not allowed", {"Allow": "POST"})
        if self.settings.require_https and not req.is_secure:
            return _error(403, "HTTPS required")
        if length is not None and length > self.settings.max_bytes:
            return self._too_large()
        if length is None and _unreadable_chunks(req.environ):
            return _error(411, "the server passed on no chunked body: send a Content-Length")
        # The sender's exact header needs no parsing (Request.is_json parses it).
        if req.environ.get("CONTENT_TYPE") != "application/json" and not req.is_json:
            return _error(415, "Content-Type must be application/json")
        return None

    def _too_large(self) -> Response:
        return _error(
            413, f"body larger than {self.settings.max_bytes} bytes", {"Connection": "close"}
        )

    def _check_age(self, event: Event) -> None:
        max_age = self.settings.max_event_age
        if max_age is None:
            return
        if event.timestamp < datetime.now(UTC) - timedelta(seconds=max_age):
            raise InvalidEvent(f"event is older than PLOINTS_MAX_EVENT_AGE ({max_age:g} s)")


def _rejected(account: str | None) -> dict[str, t.Any]:
    return _REJECTED if account is None else delivery_fields(REJECTED, account=account)


def _unreadable_chunks(environ: dict[str, t.Any]) -> bool:
    # A chunked body the server does not mark as readable to its end
    # (uWSGI's --http-socket) reads as empty: a correctly signed delivery
    # would be answered 401, blaming the signature.
    return not environ.get("wsgi.input_terminated") and "chunked" in (
        environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    )


def _in_flight(result: Result) -> Response:
    retry_after = str(max(1, math.ceil(result.retry_after)))
    return _error(409, "event is being processed", {"Retry-After": retry_after})


def _unavailable(result: Result) -> Response:
    what = "event queue" if isinstance(result.error, DispatchError) else "dedupe store"
    return _error(503, f"{what} unavailable", {"Retry-After": _RETRY_AFTER})


#: The answer to every outcome.
_ANSWERS: dict[Outcome, t.Callable[[Result], Response]] = {
    Outcome.PROCESSED: lambda _: _json(200, _PROCESSED),
    Outcome.DUPLICATE: lambda _: _json(200, _DUPLICATE),
    Outcome.QUEUED: lambda _: _json(202, _QUEUED),
    Outcome.IN_FLIGHT: _in_flight,
    Outcome.FAILED: lambda _: _error(500, "handler failed"),
    Outcome.UNAVAILABLE: _unavailable,
}


# Reading a delivery's body so that the view and every hook see the same
# bytes, without paying for werkzeug's stream on every delivery.
#
# The public way, :meth:`Request.get_data` with ``cache=True``, reads through
# werkzeug's checked stream, which costs more than verifying the body. So when
# nothing has read the body yet and its length is known, it is read straight
# from ``wsgi.input``, as WSGI allows, and ``wsgi.input`` is then replaced by
# those bytes, where werkzeug reads them for any later hook (an
# ``after_request``, an error reporter). Whether anything read it first is
# told by werkzeug's cached ``Request.stream`` being in the request's
# ``__dict__``: an implementation detail, pinned by
# ``test_werkzeug_keeps_its_stream_in_the_request_dict``. Otherwise, and for
# chunked bodies, the public way.
def _read_body(req: Request, length: int | None, limit: int) -> bytes | None:
    """Return the body of ``req``, or ``None`` when it is over ``limit``. A
    body shorter than its ``Content-Length`` (the client went away) comes
    back short.

    :param length: the request's ``Content-Length``, already checked against
        ``limit``; ``None`` when chunked or absent.
    """
    if length is not None and "stream" not in req.__dict__:
        raw: bytes = req.environ["wsgi.input"].read(length) if length else b""
        req.environ["wsgi.input"] = io.BytesIO(raw)
        return raw
    # This endpoint's limit, not the app's MAX_CONTENT_LENGTH. For a chunked
    # body werkzeug stops at the limit without raising, so one byte more is
    # allowed to tell a body of exactly the limit from a longer one.
    req.max_content_length = limit if length is not None else limit + 1
    try:
        raw = req.get_data(cache=True)
    except RequestEntityTooLarge:
        return None
    except ClientDisconnected:
        if length is None:
            raise
        # Fewer bytes than Content-Length: werkzeug keeps none of them.
        return b""
    return raw if len(raw) <= limit else None
