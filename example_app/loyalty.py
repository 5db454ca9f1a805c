"""The example's data: customers, balances, tiers, badges, rewards and
campaign conversions, as Flask-SQLAlchemy models.

Nothing here knows about event ids: the handlers write through
``db.session`` without committing, and flask-ploints commits their writes
in one transaction with the event's dedupe record (``PLOINTS_DEDUPE_STORE =
db``), so a repeated or retried event cannot change anything twice.
"""

from __future__ import annotations

import typing as t

import sqlalchemy as sa
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Customer(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "customers"

    email: Mapped[str] = mapped_column(primary_key=True)
    name: Mapped[str | None]
    balance: Mapped[int] = mapped_column(default=0)
    tier: Mapped[str] = mapped_column(default="Bronze")


class Activity(db.Model):  # type: ignore[name-defined,misc]
    __tablename__ = "activity"

    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str] = mapped_column(sa.ForeignKey("customers.email"), index=True)
    kind: Mapped[str]
    detail: Mapped[str]


def record(email: str, kind: str, detail: str) -> Customer:
    """Add an activity to a customer, creating the customer on first sight,
    in the current transaction; return the customer for the caller to
    change. Nothing is committed here.
    """
    customer = db.session.get(Customer, email)
    if customer is None:
        customer = Customer(email=email, balance=0, tier="Bronze")
        db.session.add(customer)
    db.session.add(Activity(email=email, kind=kind, detail=detail))
    return customer


def customers() -> list[dict[str, t.Any]]:
    """Every customer with their activity, oldest first, as plain dicts."""
    activity: dict[str, list[str]] = {}
    for row in db.session.scalars(sa.select(Activity).order_by(Activity.id)):
        activity.setdefault(row.email, []).append(f"{row.kind}: {row.detail}")
    return [
        {
            "email": customer.email,
            "name": customer.name,
            "balance": customer.balance,
            "tier": customer.tier,
            "activity": "; ".join(activity.get(customer.email, [])) or None,
        }
        for customer in db.session.scalars(sa.select(Customer).order_by(Customer.email))
    ]
