"""Typed views of event data.

:class:`PointsEarned` models the ``points.earned`` data the sender documents.
For any type, a handler may name its own model, a dataclass (or a pydantic
model), and receive the data converted::

    @dataclass(frozen=True)
    class BadgeIssued:
        customer_email: str
        badge: str

    @webhooks.on("badge.issued", model=BadgeIssued)
    def badge(event: Event, payload: BadgeIssued) -> None:
        ...

Field names match the sender's camelCase keys in snake_case
(``customerEmail`` fills ``customer_email``); keys the model does not declare
are ignored, so Ploints can add fields without breaking handlers. Data that
does not fit the model raises :class:`PayloadError`, which counts as a
handler failure: the answer is ``500``, the claim is released, and the
sender's next retry finds the fixed deploy.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing as t

from ._errors import PayloadError

__all__ = ["PointsEarned"]

if t.TYPE_CHECKING:
    from ._events import Event

_Model = t.TypeVar("_Model")


@dataclasses.dataclass(frozen=True, slots=True)
class PointsEarned:
    """The data of a ``points.earned`` event, as the sender documents it."""

    #: The customer who earned the points.
    customer_email: str
    #: Points awarded.
    amount: int
    #: The customer's balance after the award.
    new_balance: int
    #: Why the points were awarded.
    description: str = ""


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _fits(value: t.Any, hint: t.Any) -> bool:
    if hint is t.Any:
        return True
    origin = t.get_origin(hint)
    if origin in (t.Union, types.UnionType):
        return any(_fits(value, arm) for arm in t.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is not None:
        return isinstance(value, origin)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _from_dataclass(model: type[_Model], data: t.Mapping[str, t.Any]) -> _Model:
    hints = t.get_type_hints(model)
    values: dict[str, t.Any] = {}
    for field in dataclasses.fields(model):  # type: ignore[arg-type]
        if not field.init:
            continue
        key = field.name if field.name in data else _camel(field.name)
        if key not in data:
            if (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ):
                raise PayloadError(f"{model.__name__}: missing field {key!r}")
            continue
        value = data[key]
        if not _fits(value, hints.get(field.name, t.Any)):
            raise PayloadError(
                f"{model.__name__}: field {key!r} is {type(value).__name__},"
                f" not {getattr(hints[field.name], '__name__', hints[field.name])}"
            )
        values[field.name] = value
    return model(**values)


def convert(model: type[_Model], data: t.Mapping[str, t.Any]) -> _Model:
    """Convert event data to ``model``: a dataclass, or any class with a
    pydantic-style ``model_validate`` class method.

    :raises PayloadError: the data does not fit.
    """
    if dataclasses.is_dataclass(model):
        return _from_dataclass(model, data)
    validate = getattr(model, "model_validate", None)
    if validate is None:
        raise TypeError(f"{model!r} is neither a dataclass nor has model_validate()")
    try:
        return t.cast(_Model, validate(dict(data)))
    except ValueError as exc:
        raise PayloadError(f"{model.__name__}: {exc}") from exc


def bind(func: t.Callable[..., t.Any], model: type[t.Any]) -> t.Callable[[Event], t.Any]:
    """Wrap a handler taking ``(event, payload)`` into one taking the event
    only, converting the data to ``model`` on each call.
    """
    if inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def handler(event: Event) -> t.Any:
            return await func(event, convert(model, event.data))

        return handler

    @functools.wraps(func)
    def sync_handler(event: Event) -> t.Any:
        return func(event, convert(model, event.data))

    return sync_handler
