"""Deprecated: the delivery log's storage is :mod:`flask_ploints.delivery_log`.

.. deprecated:: 0.2
"""

from __future__ import annotations

from ._deprecated import moved

__getattr__ = moved(
    __name__,
    "flask_ploints.delivery_log",
    ("OUTCOMES", "Delivery", "DeliveryLog", "DeliveryLogError"),
)
