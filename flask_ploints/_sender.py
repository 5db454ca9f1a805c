"""What the sender, Ploints, documents about its deliveries: how long it waits
for an answer and when it retries. Configuration checks, the endpoint's
messages and ``flask ploints simulate`` all take these facts from here.

.. versionadded:: 0.2
"""

from __future__ import annotations

__all__ = ["RETRY_SCHEDULE", "RETRY_SPAN", "TIMEOUT"]

#: Seconds the sender waits for an answer before it counts a timeout and
#: retries.
TIMEOUT = 10.0

#: Seconds before each attempt, counted from the one before: the first
#: delivery, then the five retries (+1 min, +5 min, +30 min, +2 h, +12 h).
#: After the last the event is marked failed and can only be resent by hand.
RETRY_SCHEDULE: tuple[int, ...] = (0, 60, 5 * 60, 30 * 60, 2 * 3600, 12 * 3600)

#: Seconds from a first delivery to the sender's last retry (about 14.6 h).
RETRY_SPAN = sum(RETRY_SCHEDULE)
