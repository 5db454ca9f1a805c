"""Effects outside the database, run once an event is committed:
:func:`after_commit`.

.. versionadded:: 0.2
"""

from __future__ import annotations

import contextvars
import functools
import logging
import typing as t

from ._logfields import event_fields
from ._outcomes import Outcome

if t.TYPE_CHECKING:
    from ._events import Event

__all__ = ["after_commit", "collect", "finish", "run"]

logger = logging.getLogger("flask_ploints")

_P = t.ParamSpec("_P")

_pending: contextvars.ContextVar[list[t.Callable[[], object]] | None] = contextvars.ContextVar(
    "ploints_after_commit", default=None
)


def after_commit(func: t.Callable[_P, object], /, *args: _P.args, **kwargs: _P.kwargs) -> None:
    """Call ``func(*args, **kwargs)`` once the event being handled is
    committed: after its last handler, and after the dedupe store recorded
    it done (with a :class:`~flask_ploints.stores.SessionStore`, after the
    transaction with the handlers' writes committed). When a handler raises,
    or a :class:`~flask_ploints.stores.SessionStore` fails to commit, it is
    never called; the sender's retry runs the handlers, and registers it,
    again. Another store that fails to record the event done still has it
    answered processed, since its handlers' effects are done, so the call
    runs.

    Use it for what cannot join a transaction, an email or an HTTP call: it
    runs at most once per committed event, and is lost if the process dies
    between the commit and the call. Done inline in a handler instead, it
    runs at least once (again on every retry of a failure). An exception it
    raises is logged; the event stays processed.

    A ``SystemExit`` or ``KeyboardInterrupt`` it raises is logged as its
    failure too, and not carried out: the event is committed, so the answer
    must be the ``200`` that stops the sender's retries, and the calls after
    it still run. A server's worker cannot go down after its answer from
    inside the view that makes it, so a call that must stop the process
    should signal it instead (``os.kill(os.getpid(), signal.SIGTERM)``),
    which lets the server finish the answer first.

    .. versionchanged:: 0.2
        A process exit raised by the call no longer escapes the request.

    :raises RuntimeError: called outside an event's handlers.
    """
    pending = _pending.get()
    if pending is None:
        raise RuntimeError("after_commit() works only inside the handlers of an event")
    pending.append(functools.partial(func, *args, **kwargs))


def collect() -> tuple[list[t.Callable[[], object]], contextvars.Token[t.Any]]:
    """Start collecting the calls of the handlers about to run; give the
    token back to :func:`finish`.
    """
    pending: list[t.Callable[[], object]] = []
    return pending, _pending.set(pending)


def finish(token: contextvars.Token[t.Any]) -> None:
    """Stop collecting, after the handlers ran."""
    _pending.reset(token)


def run(pending: list[t.Callable[[], object]], event: Event) -> None:
    """Call what the handlers of ``event`` left to do after its commit,
    in order; one that raises is logged and the rest still run.
    """
    for call in pending:
        try:
            call()
        except (KeyboardInterrupt, SystemExit) as exc:
            # The event is committed: raising on would answer the sender an
            # error (or nothing) and have it retry what is done.
            logger.error(
                "event %r: an after_commit call raised %s, not carried out: the event is"
                " committed and answered processed",
                event.id,
                type(exc).__name__,
                exc_info=exc,
                extra=event_fields(event, Outcome.PROCESSED),
            )
        except BaseException:
            logger.exception(
                "event %r: an after_commit call raised",
                event.id,
                extra=event_fields(event, Outcome.PROCESSED),
            )
