"""Reading a delivery's body so that the view and every hook see the same
bytes, without paying for werkzeug's stream on every delivery.

The public way, :meth:`Request.get_data` with ``cache=True``, reads through
werkzeug's checked stream, which costs more than verifying the body. So when
nothing has read the body yet and its length is known, it is read straight
from ``wsgi.input``, as WSGI allows, and ``wsgi.input`` is then replaced by
those bytes, where werkzeug reads them for any later hook (an
``after_request``, an error reporter). Whether anything read it first is
told by werkzeug's cached ``Request.stream`` being in the request's
``__dict__``: an implementation detail, pinned by
``test_werkzeug_keeps_its_stream_in_the_request_dict``. Otherwise, and for
chunked bodies, the public way.

.. versionadded:: 0.2
"""

from __future__ import annotations

import io

from flask import Request
from werkzeug.exceptions import ClientDisconnected
from werkzeug.exceptions import RequestEntityTooLarge

__all__ = ["read_body"]


def read_body(req: Request, length: int | None, limit: int) -> bytes | None:
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
